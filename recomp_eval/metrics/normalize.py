"""Answer normalisers and parsers: EvalAI (VQAv2/TextVQA), GQA, POPE and MME.

Every function here is a pure ``str -> str`` (or ``str -> label``) step. Named steps are
registered in :mod:`recomp_eval.metrics.registry` so that benchmark configs can list an answer
pipeline such as ``[strip, lowercase, evalai]``.

The EvalAI processor reproduces the one used by the VQA evaluation server, the m4c TextVQA
evaluator and lmms-eval 0.7.3, including two quirks of the original that change results and are
kept on purpose for parity:

* the period regex is written ``(?!<=\\d)(\\.)(?!\\d)`` (a negative look-*ahead* for the two
  characters ``<=`` followed by a digit, not the intended look-behind), so ``"1.5"`` keeps its
  period only because of the trailing ``(?!\\d)``;
* ``re.UNICODE`` (== 32) is passed in the ``count`` slot of ``re.sub``, so at most 32 periods are
  removed from one answer.
"""

from __future__ import annotations

import re
import string
from typing import Literal

# --- EvalAI tables ------------------------------------------------------------------------------

# Contractions written without an apostrophe -> the canonical form. One "wrong spelling ->
# canonical" pair per line. The table is the EvalAI one: it contains a few entries that can never
# fire after lower-casing (capitalised keys) and one reversed entry (somebody'd -> somebodyd);
# both are kept because removing them would change scores relative to the official evaluators.
_CONTRACTION_TABLE = """
aint ain't|arent aren't|cant can't|couldve could've|couldnt couldn't|couldn'tve couldn't've
couldnt've couldn't've|didnt didn't|doesnt doesn't|dont don't|hadnt hadn't|hadnt've hadn't've
hadn'tve hadn't've|hasnt hasn't|havent haven't|hed he'd|hed've he'd've|he'dve he'd've|hes he's
howd how'd|howll how'll|hows how's|Id've I'd've|I'dve I'd've|Im I'm|Ive I've|isnt isn't|itd it'd
itd've it'd've|it'dve it'd've|itll it'll|let's let's|maam ma'am|mightnt mightn't
mightnt've mightn't've|mightn'tve mightn't've|mightve might've|mustnt mustn't|mustve must've
neednt needn't|notve not've|oclock o'clock|oughtnt oughtn't|ow's'at 'ow's'at|'ows'at 'ow's'at
'ow'sat 'ow's'at|shant shan't|shed've she'd've|she'dve she'd've|she's she's|shouldve should've
shouldnt shouldn't|shouldnt've shouldn't've|shouldn'tve shouldn't've|somebody'd somebodyd
somebodyd've somebody'd've|somebody'dve somebody'd've|somebodyll somebody'll
somebodys somebody's|someoned someone'd|someoned've someone'd've|someone'dve someone'd've
someonell someone'll|someones someone's|somethingd something'd|somethingd've something'd've
something'dve something'd've|somethingll something'll|thats that's|thered there'd
thered've there'd've|there'dve there'd've|therere there're|theres there's|theyd they'd
theyd've they'd've|they'dve they'd've|theyll they'll|theyre they're|theyve they've|twas 'twas
wasnt wasn't|wed've we'd've|we'dve we'd've|weve we've|werent weren't|whatll what'll
whatre what're|whats what's|whatve what've|whens when's|whered where'd|wheres where's
whereve where've|whod who'd|whod've who'd've|who'dve who'd've|wholl who'll|whos who's
whove who've|whyll why'll|whyre why're|whys why's|wont won't|wouldve would've|wouldnt wouldn't
wouldnt've wouldn't've|wouldn'tve wouldn't've|yall y'all|yall'll y'all'll|y'allll y'all'll
yall'd've y'all'd've|y'alld've y'all'd've|y'all'dve y'all'd've|youd you'd|youd've you'd've
you'dve you'd've|youll you'll|youre you're|youve you've
"""
CONTRACTIONS: dict[str, str] = {
    key: value
    for key, value in (
        pair.strip().split(" ")
        for pair in _CONTRACTION_TABLE.replace("\n", "|").split("|")
        if pair.strip()
    )
}

_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
NUMBER_MAP: dict[str, str] = {"none": "0", "ten": "10"} | {
    word: str(digit) for digit, word in enumerate(_NUMBER_WORDS)
}
ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})
# Characters removed (if next to a space, or if the text has "digit,digit") or else replaced by
# a space. The order matters only through the in-place replacement; it follows EvalAI.
PUNCTUATIONS: tuple[str, ...] = tuple(';/[]"{}()=+\\_-><@`,?!')
# Written exactly as in the EvalAI processor (see module docstring).
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")
# The EvalAI code passes the flag re.UNICODE positionally as ``count``.
_PERIOD_STRIP_COUNT = int(re.UNICODE)


def evalai_word_tokenize(text: str) -> str:
    """m4c entry step: lower-case, delete ``,`` and ``?``, split ``'s`` off, strip."""
    return text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()


def evalai_punctuation(text: str) -> str:
    """EvalAI ``processPunctuation``: delete or space out punctuation, then strip periods."""
    delete_all = COMMA_STRIP.search(text) is not None
    out = text
    for p in PUNCTUATIONS:
        # The test looks at the *input* text, not the partially processed one (as EvalAI does).
        if delete_all or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def evalai_digit_article(text: str) -> str:
    """EvalAI ``processDigitArticle``: lower-case, number words -> digits, drop articles,
    expand contractions, re-join on single spaces."""
    words = [NUMBER_MAP.get(w, w) for w in text.lower().split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words)


def evalai_normalize(text: str) -> str:
    """Full m4c / EvalAI answer processor (TextVQA evaluator, VQA submission files)."""
    text = evalai_word_tokenize(text)
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return evalai_digit_article(evalai_punctuation(text))


def vqa_normalize(text: str) -> str:
    """lmms-eval 0.7.3 ``vqav2_process_results`` steps: whitespace clean-up, punctuation, then
    digits/articles (no ``word_tokenize`` step, unlike :func:`evalai_normalize`)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return evalai_digit_article(evalai_punctuation(text))


# --- GQA ----------------------------------------------------------------------------------------

_PUNCT_TABLE = str.maketrans("", "", string.punctuation)


def gqa_normalize_lmms_eval(text: str) -> str:
    """lmms-eval ``exact_match`` with ignore_case + ignore_punctuation (applied to the stripped
    generation and to the unstripped gold answer)."""
    return text.lower().translate(_PUNCT_TABLE)


def gqa_normalize_llava(text: str) -> str:
    """LLaVA ``convert_gqa_for_eval`` on a stripped generation: drop trailing periods,
    lower-case. The gold answer is compared as-is (official GQA ``eval.py``)."""
    return text.rstrip(".").lower()


# --- POPE ---------------------------------------------------------------------------------------

YesNo = Literal["yes", "no"]
_POPE_NEGATIONS = frozenset({"No", "not", "no"})


def parse_pope_llava(text: str) -> YesNo:
    """LLaVA ``eval_pope``: first sentence, commas removed, ``no`` if any space-separated word
    is ``No``/``not``/``no`` (case-sensitive), else ``yes``. Never unparseable."""
    first = text.split(".")[0] if "." in text else text
    words = first.replace(",", "").split(" ")
    return "no" if _POPE_NEGATIONS.intersection(words) else "yes"


def parse_pope_strict(text: str) -> YesNo | None:
    """lmms-eval 0.7.3: ``lower().strip()`` must be exactly ``yes``/``no``; else ``None``."""
    label = text.lower().strip()
    return label if label in ("yes", "no") else None  # type: ignore[return-value]


# --- MME ----------------------------------------------------------------------------------------

MmeLabel = Literal["yes", "no", "other"]
_MME_PREFIX_CHARS = 4  # both parsers look for yes/no within the first 4 characters


def parse_mme_lmms_eval(text: str) -> MmeLabel:
    """lmms-eval 0.7.3 (Otter) parser: lower, strip, drop ``.``; exact yes/no; single ``y``/``n``;
    else ``yes`` then ``no`` within the first 4 characters; else ``other``."""
    ans = text.lower().strip().replace(".", "")
    if ans in ("yes", "no"):
        return ans  # type: ignore[return-value]
    if len(ans) == 1:
        return {"y": "yes", "n": "no"}.get(ans, "other")  # type: ignore[return-value]
    return _mme_prefix(ans)


def parse_mme_tool(text: str) -> MmeLabel:
    """MME toolkit ``calculation.py`` (used by LLaVA): lower-case only; exact yes/no, else the
    4-character prefix rule. Differs from lmms-eval on ``y``/``n``, on periods and on leading
    whitespace (not stripped here)."""
    ans = text.lower()
    if ans in ("yes", "no"):
        return ans  # type: ignore[return-value]
    return _mme_prefix(ans)


def _mme_prefix(ans: str) -> MmeLabel:
    prefix = ans[:_MME_PREFIX_CHARS]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"
