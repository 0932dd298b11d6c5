"""Run one vLLM engine configuration on a batch of images and print its results as one JSON line.

``tests/test_vllm_parallel.py`` starts this in a fresh process per parallel configuration (each with
its own ``VLLM_CPU_OMP_THREADS_BIND``), so engines of different tensor/pipeline parallel sizes never
share a process. Usage::

    python vllm_parallel_run.py CKPT '{"tp": 2, "pp": 1, "options": {...} | null}' '[[h, w], ...]'

(the spec may name the family served: ``"arch"``, ``"prompt"``, ``"limit_mm_per_prompt"``; LLaVA-NeXT's by default).

Prints ``RESULT {"prompt_ids": [[...], ...], "tokens": [[...], ...]}`` (one entry per image, in order).
"""

from __future__ import annotations

import json
import os
import sys

PROMPT = "USER: <image>\nwhat is this ? ASSISTANT:"
MAX_TOKENS = 8


def main(argv: list[str]) -> None:
    ckpt, spec, sizes = argv[0], json.loads(argv[1]), json.loads(argv[2])
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    from globalcom2.integrations.vllm import ARCHITECTURE
    from globalcom2.testing.tiny import demo_image

    tp, pp, options = int(spec["tp"]), int(spec["pp"]), spec.get("options")
    arch, prompt = spec.get("arch", ARCHITECTURE), spec.get("prompt", PROMPT)  # the family served (LLaVA-NeXT)
    kwargs = {}
    if tp * pp > 1:
        kwargs["distributed_executor_backend"] = "mp"
    if pp > 1:
        # vLLM 0.32's CPU worker allocates the pipeline's intermediate-tensor buffers in its warm-up
        # pass, which it skips under enforce_eager (CompilationMode.NONE): the later stage then fails
        # with `assert self.intermediate_tensors is not None`. Dynamo with the eager backend keeps
        # the warm-up and compiles nothing.
        kwargs["compilation_config"] = {"mode": 1, "backend": "eager"}
    else:
        kwargs["enforce_eager"] = True
    llm = LLM(
        ckpt,
        hf_overrides=None if options is None else {"architectures": [arch], "globalcom2": options},
        dtype="float32",
        max_model_len=2048,
        seed=0,
        limit_mm_per_prompt=spec.get("limit_mm_per_prompt", {"image": 1}),
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        **kwargs,
    )
    imgs = [demo_image(height=h, width=w, seed=i + 1) for i, (h, w) in enumerate(sizes)]
    reqs = [{"prompt": prompt, "multi_modal_data": {"image": img}} for img in imgs]
    outs = llm.generate(
        reqs, SamplingParams(max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    )
    result = {
        "prompt_ids": [list(o.prompt_token_ids) for o in outs],
        "tokens": [list(o.outputs[0].token_ids) for o in outs],
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
