"""``scripts/train_tiny.py``: stage-2 training sequences, the grounding losses' targets and
attention mass (against eager attention weights), and a tiny end-to-end run with resume."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import scripts_module

from recomp_eval.synth import scenes as S

T = scripts_module("train_tiny")
L = scripts_module("train_tiny_llava")


@pytest.fixture(scope="module")
def tok():
    return L.llava_tokenizer(0)


@pytest.fixture(scope="module")
def batch(tok):
    examples = [L.make_example(tok, 0, i, 3, 12) for i in range(2)]
    labels = torch.stack([torch.from_numpy(T.patch_labels(S.make_scene(0, i))) for i in range(2)])
    return examples, L.collate(examples, tok.pad_token_id), labels


def test_query_rows_predict_the_first_answer_token(tok, batch):
    examples, b, _ = batch
    for i, ex in enumerate(examples):
        _, _, block, _, labels, rows, targets, words = ex
        assert len(rows) == len(targets) == len(words) == 12
        for j, row in enumerate(rows):
            assert block[row] == j and labels[row] != T.IGNORE  # first answer token
            assert labels[row - 1] == T.IGNORE  # nothing before it in the block is a target
        assert b["rows"][i, : len(rows)].tolist() == rows


def test_grounding_targets_point_at_the_object_and_its_words(tok, batch):
    examples, b, labels = batch
    hits = L.grounding_targets(b, labels[..., 4])
    n_checked = 0
    for i, ex in enumerate(examples):
        ids, is_img, *_ = ex
        img_pos = [p for p, v in enumerate(is_img) if v]  # raster order of the 576 patches
        for j, t in enumerate(ex[6]):
            patch_hits = hits["patches"][i, j].nonzero().flatten().tolist()
            word_hits = hits["words"][i, j].nonzero().flatten().tolist()
            if t < 0:
                assert patch_hits == []
                continue
            want = [img_pos[k] for k in (labels[i, :, 4] == t).nonzero().flatten().tolist()]
            assert patch_hits == want and want, T.DESCRIPTIONS[t]
            said = {tok.convert_ids_to_tokens(ids[p]) for p in word_hits}
            # empty only when the question names the object by its character ("the letter X")
            assert said <= set(T.DESCRIPTIONS[t].split()), (said, T.DESCRIPTIONS[t])
            n_checked += bool(said)
    assert n_checked >= 10


def test_attention_mass_equals_eager_attention_weights(tok, batch):
    from transformers import LlamaConfig, LlamaModel

    _, b, labels = batch
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                      rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                      attn_implementation="eager")  # fmt: skip
    model = LlamaModel(cfg).eval()
    attn = model.layers[1].self_attn
    seen = {}

    def capture(module, a, kw):
        seen["hidden"], seen["rope"] = kw["hidden_states"], kw["position_embeddings"]

    handle = attn.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            out = model(input_ids=b["ids"], attention_mask=b["mask"], position_ids=b["pos"],
                        output_attentions=True)  # fmt: skip
    finally:
        handle.remove()
    hit = L.grounding_targets(b, labels[..., 4])["patches"]  # [B,K,L]
    got = L.attention_mass(attn, seen["hidden"], *seen["rope"], b["rows"], b["mask"], hit)
    weights = out.attentions[1][:, 0]  # [B,L,L] head 0 of layer 1 (the oracle)
    rows = weights.gather(1, b["rows"][..., None].expand(-1, -1, weights.shape[-1]))  # [B,K,L]
    want = (rows * hit).sum(-1)  # [B,K]
    valid = hit.any(-1)
    assert valid.sum() >= 10
    torch.testing.assert_close(got.exp()[valid], want[valid], rtol=1e-4, atol=1e-6)


TINY = [
    "--seed", "0", "--threads", "1", "--log-every", "1", "--save-every", "0",
    "--vit-width", "32", "--vit-layers", "2", "--vit-heads", "2", "--text-width", "32",
    "--proj-dim", "16", "--s1-scenes", "6", "--s1-steps", "3", "--s1-batch", "2",
    "--s1-batch-full", "2", "--s1-crop", "6", "--s1-warmup", "1",
    "--llm-width", "32", "--llm-layers", "3", "--llm-heads", "2", "--s2-images", "4",
    "--s2-steps", "3", "--s2-batch", "1", "--s2-questions", "4", "--s2-warmup", "1",
]  # fmt: skip


def test_tiny_training_run_writes_a_loadable_model_and_resumes(tmp_path, capsys):
    from recomp_eval.models.llava.loader import load_clip_text, load_llava

    work, out = tmp_path / "work", tmp_path / "model"
    T.main([*TINY, "--work", str(work), "--out", str(out)])
    first = torch.load(work / "stage2.pt")["model"]
    bundle = load_llava(str(out), dtype="float32")
    assert bundle.model.config.text_config.rope_parameters["rope_theta"] == 1e6
    assert load_clip_text(bundle.clip_text_id, dtype="float32") is not None
    log = capsys.readouterr().out
    assert "attn_words=" in log and "attn_patches=" in log
    # resume with more steps continues from the checkpoint (steps 1-3 are not run again)
    T.main([*TINY, "--work", str(work), "--out", str(out), "--resume", "--stage", "2",
            "--s2-steps", "4"])  # fmt: skip
    log = capsys.readouterr().out
    assert "resumed stage 2 at step 3" in log and "s2 step 4/4" in log
    assert "s2 step 1/4" not in log
    assert torch.load(work / "stage2.pt")["step"] == 4
    assert json.loads((work / "args.json").read_text())["s2_steps"] == 4
    assert any(
        not torch.equal(first[k], v) for k, v in torch.load(work / "stage2.pt")["model"].items()
    )


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--stage", "2"], "no stage-1 output"),
        (["--s2-attn-layers", "1,7"], "distinct decoder layers in 0..3"),
        (["--s2-attn-layers", "0,1", "--s2-word-layers", "0"], "distinct decoder layers"),
        (["--s2-word-layers", "x"], "comma-separated"),
    ],
)
def test_bad_arguments_stop_with_one_line(tmp_path, extra, message):
    with pytest.raises(SystemExit) as err:
        T.main(["--work", str(tmp_path / "work"), *extra])
    text = str(err.value.code)
    assert message in text and "\n" not in text
    assert not (tmp_path / "work" / "stage1.pt").exists()  # nothing started
