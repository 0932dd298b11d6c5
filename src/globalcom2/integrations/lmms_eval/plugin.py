"""lmms-eval model ``globalcom2``: stock HF LLaVA-NeXT from a local checkpoint, with a compression method applied.

``--model_args pretrained=PATH,method=globalcom2,retention_ratio=0.25[,OPTION=VALUE...]``; ``method=none`` runs
the unpatched model (the baseline row). Plugin keys: see ``options.LOADER_ARGS``; every other key is an option
of the method and is validated by ``globalcom2.make_config``. Images only (no video); one turn.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from lmms_eval import utils
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from loguru import logger
from PIL import Image
from tqdm import tqdm

from ... import apply
from ...tools import model_args as opts

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def _dtype(value: Any, device: torch.device) -> torch.dtype:
    """``dtype`` model arg: a name, or "auto" = float16 on GPU and float32 on CPU."""
    if isinstance(value, torch.dtype):
        return value
    name = str(value).lower().removeprefix("torch.")
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of (auto, {', '.join(_DTYPES)}), got {value!r}")
    return _DTYPES[name]


class _Force:
    """Logits processor that allows only the next token of a fixed sequence (the raw logits stay untouched)."""

    def __init__(self, tokens: list[int]) -> None:
        self.tokens, self.step = tokens, 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        forced = torch.full_like(scores, -float("inf"))
        forced[:, self.tokens[min(self.step, len(self.tokens) - 1)]] = 0.0
        self.step += 1
        return forced


class GlobalCom2LlavaNext(lmms):
    """LLaVA-NeXT (transformers) with a globalcom2 compression method, for lmms-eval's simple-model API."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        method: str = "globalcom2",
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        max_new_tokens: int = 1024,
        attn_implementation: str | None = None,
        conv_template: str = "auto",
        chat_template: str | None = None,
        use_cache: bool = True,
        local_files_only: bool = True,
        **method_options: Any,
    ) -> None:
        super().__init__()
        del max_batch_size  # lmms-eval passes it for --batch_size auto, which this model does not do
        self.choice = opts.method_choice(method, **method_options)  # validate before loading anything
        self._set_prompting(conv_template, chat_template)
        self.batch_size_per_gpu = opts.batch_size_arg(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.use_cache = bool(opts.coerce(use_cache))
        self._set_device(device)
        self.pretrained = str(pretrained)
        self._load(self.pretrained, dtype, attn_implementation, bool(opts.coerce(local_files_only)))
        logger.info(f"globalcom2: {self.pretrained} on {self._device}, method={self.method_label}")

    def _set_prompting(self, conv_template: str, chat_template: str | None) -> None:
        """The conversation template (validated) and a chat template given inline or as a file."""
        if conv_template not in opts.CONV_TEMPLATES:
            raise ValueError(f"conv_template must be one of ({', '.join(opts.CONV_TEMPLATES)}), got {conv_template!r}")
        self.conv_template = conv_template
        if chat_template is not None and os.path.isfile(str(chat_template)):
            with open(str(chat_template), encoding="utf-8") as f:
                chat_template = f.read()
        self.chat_template = chat_template

    def _set_device(self, device: str | None) -> None:
        """One full model per process: accelerate's data parallel (``accelerate launch``) or ``device``."""
        from accelerate import Accelerator

        accelerator = Accelerator()
        if accelerator.num_processes > 1:
            self._device = torch.device(f"cuda:{accelerator.local_process_index}")
            self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
        else:
            self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.accelerator = accelerator

    def _load(self, pretrained: str, dtype: str, attn_implementation: str | None, local_files_only: bool) -> None:
        """The checkpoint's family picks the model class; the method is applied unless it is the stock row."""
        import transformers
        from transformers import AutoConfig, AutoProcessor

        from ...models import FAMILIES, adapter_for

        load = {"local_files_only": local_files_only}
        config = AutoConfig.from_pretrained(pretrained, **load)
        try:
            family = adapter_for(config, "pretrained")
        except TypeError:
            types = ", ".join(repr(f.family) for f in FAMILIES)
            raise TypeError(
                f"--model globalcom2 runs checkpoints of model_type ({types}); {pretrained} is "
                f"{getattr(config, 'model_type', None)!r}"
            ) from None
        self.family = family.family
        kwargs: dict[str, Any] = {"dtype": _dtype(dtype, self._device), **load}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        model = getattr(transformers, family.model_classes[0]).from_pretrained(pretrained, **kwargs)
        model = model.to(self._device).eval()
        if not self.choice.is_stock:
            apply(model, self.choice.config)
        self._model = model
        self.processor = AutoProcessor.from_pretrained(pretrained, **load)
        self._tokenizer = self.processor.tokenizer
        self._tokenizer.padding_side = "left"  # batched generation

    # ---------------------------------------------------------------- lmms-eval's accessors

    @property
    def model(self) -> torch.nn.Module:
        """The (patched) ``LlavaNextForConditionalGeneration`` or ``InternVLForConditionalGeneration``."""
        return self._model

    @property
    def tokenizer(self) -> Any:
        """The processor's tokenizer (left padding)."""
        return self._tokenizer

    @property
    def config(self) -> Any:
        """The model's config."""
        return self._model.config

    @property
    def device(self) -> torch.device:
        """Where the model runs."""
        return self._device

    @property
    def batch_size(self) -> int:
        """Requests per ``generate`` call."""
        return self.batch_size_per_gpu

    @property
    def eot_token_id(self) -> int:
        """End-of-sequence token id."""
        return self._tokenizer.eos_token_id

    @property
    def method_label(self) -> str:
        """e.g. ``globalcom2(retention_ratio=0.25)`` or ``none``."""
        if self.choice.is_stock:
            return "none"
        cfg = self.choice.config
        return f"{cfg.name}({', '.join(f'{k}={getattr(cfg, k)!r}' for k in cfg.option_names())})"

    # ---------------------------------------------------------------- prompts and inputs

    def prompt(self, question: str, n_images: int) -> str:
        """The model prompt for one question: the processor's chat template, or LLaVA's USER/ASSISTANT format."""
        template = self.chat_template
        if template is None and self.conv_template == "auto":
            template = getattr(self.processor, "chat_template", None) or getattr(self._tokenizer, "chat_template", None)
        if template is None:
            prompt = opts.fallback_prompt(question, n_images, self.conv_template)
            token = getattr(self.processor, "image_token", None) or "<image>"  # InternVL: <IMG_CONTEXT>
            return prompt.replace("<image>", token)
        messages = opts.conversation(question, n_images)
        return self.processor.apply_chat_template(
            messages, chat_template=template, add_generation_prompt=True, tokenize=False
        )

    def _visuals(self, doc_to_visual: Any, task: str, split: str, doc_id: int) -> list[Image.Image]:
        """The images of one document, as RGB PIL images."""
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
        out = []
        for v in visuals:
            if not isinstance(v, Image.Image):
                raise NotImplementedError(f"--model globalcom2 takes images only, got {type(v).__name__} ({task})")
            out.append(v.convert("RGB"))
        return out

    def _inputs(self, prompts: list[str], images: list[Image.Image]) -> Any:
        """Processor output for a batch, on the model's device and dtype."""
        batch = self.processor(images=images or None, text=prompts, return_tensors="pt", padding=True)
        batch = batch.to(self._device, self._model.dtype)
        if images and not self.choice.is_stock:
            from ...models import adapter_for

            batch.update(adapter_for(self._model).processor_kwargs(self.processor, images))  # what inputs lack
        return batch

    # ---------------------------------------------------------------- requests

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answer each request; batches of ``batch_size``, longest prompts first, grouped by generation kwargs."""

        def by_length(args: tuple) -> tuple[int, str]:
            return -len(self._tokenizer.encode(args[0], add_special_tokens=False)), args[0]

        order = utils.Collator([r.args for r in requests], by_length, grouping=True)
        chunks = order.get_batched(n=self.batch_size, batch_fn=None)
        n_batches = (len(requests) + self.batch_size - 1) // self.batch_size
        bar = tqdm(total=n_batches, disable=self.rank != 0, desc="Model Responding")
        res: list[str] = []
        for chunk in chunks:
            contexts, all_gen_kwargs, doc_to_visual, doc_ids, tasks, splits = zip(*chunk)
            prompts, images = [], []
            for ctx, d2v, doc_id, task, split in zip(contexts, doc_to_visual, doc_ids, tasks, splits):
                visuals = self._visuals(d2v, task, split, doc_id)
                images.extend(visuals)
                prompts.append(self.prompt(ctx, len(visuals)))
            gen = dict(all_gen_kwargs[0])  # the Collator groups requests with equal kwargs; never mutate the task's
            until = gen.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            texts = self._generate(prompts, images, gen)
            for ctx, gk, text in zip(contexts, all_gen_kwargs, texts):
                text = opts.truncate(text, until)
                res.append(text)
                self.cache_hook.add_partial("generate_until", (ctx, gk), text)
            bar.update(1)
        bar.close()
        return order.get_original(res)

    @torch.inference_mode()
    def _generate(self, prompts: list[str], images: list[Image.Image], gen: dict[str, Any]) -> list[str]:
        """One batched ``generate`` call; greedy unless the task asks for a temperature > 0."""
        inputs = self._inputs(prompts, images)
        temperature = float(gen.get("temperature") or 0.0)
        # Sample only at a temperature > 0 that the task does not veto with do_sample: false (MM-Vet's yaml has
        # temperature 0.2 and do_sample false: greedy, as LLaVA's own MM-Vet script).
        do_sample = temperature > 0 and gen.get("do_sample") is not False
        kwargs: dict[str, Any] = {
            "max_new_tokens": int(gen.get("max_new_tokens") or self.max_new_tokens),
            "num_beams": int(gen.get("num_beams") or 1),
            "do_sample": do_sample,
            "use_cache": self.use_cache,
            "pad_token_id": self._tokenizer.pad_token_id
            if self._tokenizer.pad_token_id is not None
            else self.eot_token_id,
            "eos_token_id": self.eot_token_id,
        }
        if do_sample:
            kwargs["temperature"] = temperature
            if gen.get("top_p") is not None:
                kwargs["top_p"] = float(gen["top_p"])
        else:  # greedy: no sampling knobs, so generation_config's sampling defaults don't warn or apply
            kwargs.update(temperature=None, top_p=None, top_k=None)
        out = self._model.generate(**inputs, **kwargs)
        new_tokens = out[:, inputs["input_ids"].shape[1] :]
        return self._tokenizer.batch_decode(new_tokens, skip_special_tokens=True)

    @torch.inference_mode()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Sum of log-probabilities of each continuation after its prompt, and whether it is the greedy one."""
        res = []
        for context, target, d2v, doc_id, task, split in tqdm(
            [r.args for r in requests], disable=self.rank != 0, desc="Model Responding"
        ):
            doc = self.task_dict[task][split][doc_id]
            continuation = target if isinstance(target, str) else target(doc)
            visuals = self._visuals(d2v, task, split, doc_id)
            prompt = self.prompt(context, len(visuals))
            full = self._inputs([prompt + continuation], visuals)
            n_prompt = self._inputs([prompt], visuals)["input_ids"].shape[1]
            n_cont = full["input_ids"].shape[1] - n_prompt
            if n_cont < 1:
                raise ValueError(f"continuation {continuation!r} adds no tokens to the prompt ({task}, doc {doc_id})")
            targets = full["input_ids"][0, -n_cont:]
            logits = self._continuation_logits(full, prompt, visuals, targets).float()
            logprobs = torch.log_softmax(logits, dim=-1)
            targets = targets.to(logits.device)
            total = float(logprobs.gather(-1, targets[:, None]).sum())
            greedy = bool((logits.argmax(dim=-1) == targets).all())
            res.append((total, greedy))
            self.cache_hook.add_partial("loglikelihood", (context, continuation), (total, greedy))
        return res

    def _continuation_logits(
        self, full: Any, prompt: str, visuals: list[Image.Image], targets: torch.Tensor
    ) -> torch.Tensor:
        """(n_cont, vocab) logits predicting each continuation token, as generation would see them."""
        n_cont = targets.numel()
        if self.choice.is_stock or self.choice.config.where != "llm":
            # Vision-side compression shortens the sequence before the LLM but keeps the text tail: the last
            # n_cont + 1 positions predict the continuation. One forward pass.
            return self._model(**full, use_cache=False).logits[0, -(n_cont + 1) : -1]
        # In-LLM methods (FastV) prune by the last prompt token's attention at prefill; score the continuation
        # under exactly that: generation forced along the continuation, reading the raw logits of each step.
        from transformers import LogitsProcessorList

        out = self._model.generate(
            **self._inputs([prompt], visuals),
            max_new_tokens=n_cont,
            min_new_tokens=n_cont,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            logits_processor=LogitsProcessorList([_Force(targets.tolist())]),
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=self._tokenizer.pad_token_id,
            use_cache=True,
        )
        return torch.cat(list(out.logits), dim=0)

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        """Not supported (none of the paper's benchmarks is multi-round)."""
        raise NotImplementedError("--model globalcom2 answers single-turn tasks only (no generate_until_multi_round)")
