"""``RecompLlava``: an lmms-eval simple model that runs our batched pipeline with a compression
method (imported by lmms-eval only; it imports lmms-eval).

    python -m lmms_eval --model recomp_llava \\
      --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=recomp,variant=paper,retention=0.1 \\
      --tasks gqa,pope,mme --batch_size 8

Prompts, image placeholder, injection and generation are ours (``protocol=lmms_eval``: what
lmms-eval's ``llava_hf`` wrapper renders), so the plugin answers as ``recomp-eval
protocol=lmms_eval`` does on the same samples. Methods and options go through the same
validation as the Hydra path (:func:`recomp_eval.runs.expand_runs`, ``build_method``).
"""

from __future__ import annotations

import json
import os
from typing import Any

from lmms_eval.api.instance import GenerationResult, TokenCounts
from lmms_eval.api.model import lmms

from recomp_eval.lmms_plugin.args import DEFAULT_MAX_NEW_TOKENS, PluginArgs, parse_model_args

PROTOCOL = "lmms_eval"


class RecompLlava(lmms):
    """LLaVA-family checkpoint + one compression method, batched (``--batch_size``)."""

    is_simple = True

    def __init__(self, batch_size: int | str = 1, device: str | None = None,
                 max_batch_size: Any = None, **model_args: Any) -> None:  # fmt: skip
        super().__init__()
        from recomp_eval.models import load_model

        self.args: PluginArgs = parse_model_args(model_args, device=device)
        self.batch_size_per_gpu = int(batch_size) if str(batch_size).isdigit() else 1
        # under accelerate launch lmms-eval shards the requests and sets _rank/_world_size on the
        # instance itself; each process puts its model on its own GPU (cuda:LOCAL_RANK)
        local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
        self.method = self.args.build()
        self.bundle = load_model(self.args.model_config(local_rank))
        self.requests_file = self.args.requests_file()
        if self.requests_file is not None and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
            rank = os.environ.get("RANK", "0")  # one file per process: appends never interleave
            name = f"{self.requests_file.stem}.rank{rank}{self.requests_file.suffix}"
            self.requests_file = self.requests_file.with_name(name)
        self.side_rows: list[dict[str, Any]] = []  # kept tokens and stage times per request

    @property
    def device(self) -> Any:
        """The model's device (lmms-eval's evaluator puts its gather tensors there)."""
        return self.bundle.device

    def __repr__(self) -> str:
        """Stable, and different for every checkpoint or compression setting: lmms-eval keys
        its response cache on it."""
        return f"RecompLlava({self.args.identity()})"

    def clean(self) -> None:
        """lmms-eval's ``clean()`` deletes every module attribute: keep the model loaded, so
        the same instance can serve several ``simple_evaluate`` calls."""

    # --- requests -------------------------------------------------------------------------------

    def generate_until(self, requests: list[Any]) -> list[GenerationResult]:
        """Batches of equal ``gen_kwargs``, longest context first; results in request order."""
        from recomp_eval.pipeline import generate

        # each request's args: (context, gen_kwargs, doc_to_visual, doc_id, task, split)
        args = [r.args for r in requests]
        groups: dict[str, list[int]] = {}
        for i, (_, gen_kwargs, *_rest) in enumerate(args):
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(i)
        out: list[GenerationResult | None] = [None] * len(args)
        rows: list[dict[str, Any]] = []
        size = self.batch_size_per_gpu
        for indices in groups.values():
            indices.sort(key=lambda i: -len(args[i][0]))
            gen_kwargs = args[indices[0]][1]
            max_new, stop = generation_limits(gen_kwargs)
            for start in range(0, len(indices), size):
                batch = indices[start : start + size]
                images = [self.image_of(args[i]) for i in batch]
                contexts = [args[i][0] for i in batch]
                ids = [f"{args[i][4]}/{args[i][5]}/{args[i][3]}" for i in batch]
                results = generate(self.bundle, self.method, images, contexts, contexts, PROTOCOL,
                                   ids, max_new_tokens=max_new, stop=stop)  # fmt: skip
                for i, sample_id, res in zip(batch, ids, results):
                    out[i] = GenerationResult(res.text, TokenCounts(
                        input_tokens=res.text_tokens + round(res.kept_tokens),
                        output_tokens=len(res.new_token_ids)))  # fmt: skip
                    row = {"request": sample_id, "kept_tokens": res.kept_tokens,
                           "text_tokens": res.text_tokens, "new_tokens": len(res.new_token_ids),
                           "timings_ms": res.timings, "batch_size": res.batch_size,
                           "model": self.args.identity()}  # fmt: skip
                    self.side_rows.append(row)
                    rows.append(row)
                    self.cache_hook.add_partial("generate_until", (args[i][0], gen_kwargs),
                                                res.text)  # fmt: skip
        self.write_requests(rows)
        return out  # type: ignore[return-value]

    def write_requests(self, rows: list[dict[str, Any]]) -> None:
        """Kept visual tokens, token counts and stage times per request, one JSON line each,
        appended to ``requests_file`` (lmms-eval's logged samples have no place for them)."""
        if self.requests_file is None or not rows:
            return
        self.requests_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.requests_file, "a") as handle:
            handle.writelines(json.dumps(r, default=str) + "\n" for r in rows)

    def image_of(self, request_args: tuple) -> Any:
        """The document's one image (``doc_to_visual``); LLaVA-1.5 compression takes one."""
        _, _, doc_to_visual, doc_id, task, split = request_args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        if len(visuals) != 1:
            raise ValueError(
                f"recomp_llava: task {task} gives {len(visuals)} images for document {doc_id}; "
                f"this model takes exactly one image per request (single-image tasks only)"
            )
        return visuals[0].convert("RGB")

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        tasks = sorted({str(getattr(r, "task_name", "?")) for r in requests})
        raise NotImplementedError(
            f"recomp_llava answers generate_until tasks only; {', '.join(tasks)} need "
            f"loglikelihood (multiple-choice scored by option likelihood): run them with another "
            f"lmms-eval model, or use a generate_until variant of the task"
        )

    def generate_until_multi_round(self, requests: list[Any]) -> list[str]:
        raise NotImplementedError(
            "recomp_llava answers single-round generate_until tasks only (no multi-round tasks)"
        )


def generation_limits(gen_kwargs: dict[str, Any]) -> tuple[int, tuple[str, ...]]:
    """``max_new_tokens`` (lmms-eval's llava_hf default when the task sets none) and the stop
    strings (``until``; lmms-eval's default ``\\n\\n``)."""
    max_new = int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
    until = gen_kwargs.get("until", ["\n\n"])
    stop = (until,) if isinstance(until, str) else tuple(until or ())
    if float(gen_kwargs.get("temperature") or 0) > 0 or gen_kwargs.get("do_sample"):
        raise ValueError(
            "recomp_llava decodes greedily; this task asks for sampling (temperature > 0 or "
            "do_sample): set temperature: 0 in the task's generation_kwargs"
        )
    return max_new, stop
