"""MQAR mode (b): train a tiny Llama-style model on MQAR with dense attention, then score methods on it.

The model is the setup of Zoology's attention baseline at CPU scale: a 2-layer Llama (RoPE, SwiGLU,
RMSNorm) trained from scratch on freshly drawn MQAR batches (:func:`sparse_llm.eval.mqar_data.make_mqar`)
that cycle through a mix of ``(T, N)`` settings, with AdamW, linear warm-up then cosine decay, and the
cross-entropy taken at the query positions only (the LM head runs on those rows alone, which is also
what makes a step cheap). Sparse methods are then plugged in at inference, training-free.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sparse_llm.eval.mqar_data import EVAL_SEED, make_mqar

logger = logging.getLogger(__name__)

_SEED_STRIDE = 1 << 32  # training batch seeds: seed * 2**32 + step, below mqar_data.EVAL_SEED


Stages = tuple[tuple[int, tuple[tuple[int, int], ...]], ...]


@dataclass
class TinyTrainConfig:
    """A tiny MQAR model and its training run.

    Model: ``num_layers`` Llama layers of width ``hidden_size`` with ``num_heads`` query and
    ``num_kv_heads`` KV heads; ``vocab_size`` is the MQAR vocabulary (keys ``[1, V/2)``, values
    ``[V/2, V)``). Tied input/output embeddings (as Zoology's models) and q/k/v/o biases: a
    content-independent query/key part lets RoPE express "attend to the previous token", the first
    half of the recall circuit (Zoology's attention models get that from a short convolution); its
    effect was not measured apart from the curriculum's.

    Training: ``stages`` is a curriculum of ``(steps, settings)``: each stage takes its ``(T, N)``
    settings in turn, one fresh batch of ``batch_size`` sequences per AdamW step. The default first learns
    recall on short, cheap sequences (accuracy sits at chance, 1/N, for thousands of steps before it
    jumps, so those steps should be cheap) and then adapts it to longer ones. Learning rate ``lr`` after
    ``warmup_steps`` of linear warm-up, cosine-decayed to 10% over all steps; ``max_minutes`` stops early
    (the schedule is not shortened). ``num_threads`` sets torch's CPU threads while training (restored
    after; None leaves them): on a CPU shared with other processes, 1 thread avoids OpenMP workers waiting
    on each other. Every ``eval_every`` steps the accuracy on ``eval_examples`` held-out sequences of
    ``eval_setting`` is logged; ``stop_accuracy`` stops training once it is reached there (only in the
    last stage).
    """

    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    max_position_embeddings: int = 2048
    tie_embeddings: bool = True
    attention_bias: bool = True
    initializer_range: float = 0.02
    stages: Stages = ((5000, ((16, 2), (32, 4))), (1500, ((64, 4), (128, 8), (256, 16))))
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.1
    power_a: float = 0.01
    seed: int = 0
    max_minutes: float | None = None
    num_threads: int | None = 1
    log_every: int = 50
    eval_every: int = 500
    eval_setting: tuple[int, int] = (256, 16)
    eval_examples: int = 128
    stop_accuracy: float | None = None

    def __post_init__(self) -> None:
        try:
            self.stages = tuple((int(k), tuple((int(t), int(n)) for t, n in st)) for k, st in self.stages)
            self.eval_setting = (int(self.eval_setting[0]), int(self.eval_setting[1]))
        except (TypeError, ValueError):
            raise ValueError(
                f"stages must be ((steps, ((T, N), ...)), ...) and eval_setting (T, N), got "
                f"{self.stages!r} and {self.eval_setting!r}"
            ) from None
        if not self.stages or any(k < 1 or not st for k, st in self.stages):
            raise ValueError(f"stages need >= 1 step and >= 1 (T, N) setting each, got {self.stages!r}")
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "batch_size",
            "log_every",
            "eval_every",
            "eval_examples",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must divide into num_heads ({self.num_heads}) heads, "
                f"and num_heads into num_kv_heads ({self.num_kv_heads}) groups"
            )
        if not self.lr > 0 or self.warmup_steps < 0 or self.weight_decay < 0:
            raise ValueError("lr must be > 0, warmup_steps and weight_decay >= 0")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"max_minutes must be positive or None, got {self.max_minutes!r}")
        if self.num_threads is not None and (not isinstance(self.num_threads, int) or self.num_threads < 1):
            raise ValueError(f"num_threads must be a positive int or None, got {self.num_threads!r}")
        if self.stop_accuracy is not None and not 0 < self.stop_accuracy <= 1:
            raise ValueError(f"stop_accuracy must be in (0, 1] or None, got {self.stop_accuracy!r}")
        for t, n in (*(s for _, st in self.stages for s in st), self.eval_setting):
            make_mqar(1, t, n, self.vocab_size, self.power_a)  # validates (T, N) against the vocabulary
            if t > self.max_position_embeddings:
                raise ValueError(
                    f"setting T={t} exceeds max_position_embeddings={self.max_position_embeddings}"
                )

    @property
    def steps(self) -> int:
        return sum(k for k, _ in self.stages)

    def setting(self, step: int) -> tuple[int, int]:
        """The ``(T, N)`` of 1-based ``step``."""
        for k, settings in self.stages:
            if step <= k:
                return settings[(step - 1) % len(settings)]
            step -= k
        return self.stages[-1][1][(step - 1) % len(self.stages[-1][1])]


def build_model(config: TinyTrainConfig):
    """A randomly initialised Llama causal LM (sdpa attention) for ``config``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(config.seed)
    llama = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.hidden_size // config.num_heads,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_embeddings,
        attention_bias=config.attention_bias,
        initializer_range=config.initializer_range,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
    )
    return AutoModelForCausalLM.from_config(llama, attn_implementation="sdpa")


def label_logits(model, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[M, V]`` at the ``M`` labelled positions of ``inputs`` ``[B, T]`` and their targets ``[M]``.

    The LM head runs on those rows only (the rest of the sequence has no loss and no score).
    """
    hidden = model.model(input_ids=inputs).last_hidden_state
    keep = labels != -100
    return model.lm_head(hidden[keep]), labels[keep]


def _lr_factor(step: int, config: TinyTrainConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def train_tiny(config: TinyTrainConfig, progress: bool = False) -> tuple[torch.nn.Module, dict]:
    """Train a tiny model on MQAR; returns ``(model in eval mode, history)`` (see :func:`_train`)."""
    threads = torch.get_num_threads()
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    try:
        return _train(config, progress)
    finally:
        torch.set_num_threads(threads)


def _optimizer(model: torch.nn.Module, config: TinyTrainConfig):
    """AdamW with weight decay on the matrices except embeddings, and the warm-up + cosine schedule."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=config.lr,
        betas=(0.9, 0.98),
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config))


def _train_step(model, optimizer, scheduler, config: TinyTrainConfig, step: int) -> float:
    """One AdamW step on a fresh batch of the step's curriculum setting; returns the loss."""
    t, n = config.setting(step)
    inputs, labels = make_mqar(
        config.batch_size, t, n, config.vocab_size, config.power_a, seed=config.seed * _SEED_STRIDE + step
    )
    logits, targets = label_logits(model, inputs, labels)
    loss = F.cross_entropy(logits, targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    return loss.item()


def _train(config: TinyTrainConfig, progress: bool) -> tuple[torch.nn.Module, dict]:
    """The training loop of :func:`train_tiny`.

    ``history``: ``steps`` done, ``wall_s`` and ``cpu_s`` (process CPU seconds: with other processes
    on the machine, wall time alone overstates the cost), ``loss`` (``[step, mean loss]`` per
    ``log_every`` steps), ``accuracy`` (``[step, wall_s, held-out accuracy at eval_setting]`` every
    ``eval_every`` steps and at the end), ``first_loss``/``last_loss`` (means over the first and last
    ``log_every`` steps) and the ``config``.
    """
    model = build_model(config).train()
    optimizer, scheduler = _optimizer(model, config)
    # Held out: evaluation seeds start at EVAL_SEED; training batches use seed * 2**32 + step below it.
    held_out = make_mqar(
        config.eval_examples,
        *config.eval_setting,
        config.vocab_size,
        config.power_a,
        seed=EVAL_SEED - 1 - config.seed,
    )
    start, cpu_start = time.perf_counter(), time.process_time()
    losses, curve, accuracy = [], [], []

    def evaluate(step: int) -> float:
        acc = mqar_accuracy(model.eval(), *held_out).float().mean().item()
        model.train()
        accuracy.append([step, round(time.perf_counter() - start, 2), acc])
        logger.info("step %d: loss %.4f, accuracy at %s %.3f", step, curve[-1][1], config.eval_setting, acc)
        return acc

    bar = tqdm(range(1, config.steps + 1), desc="train mqar", disable=not progress, unit="step")
    step = 0
    for step in bar:
        losses.append(_train_step(model, optimizer, scheduler, config, step))
        if step % config.log_every == 0:
            curve.append([step, sum(losses[-config.log_every :]) / config.log_every])
            bar.set_postfix(loss=f"{curve[-1][1]:.3f}")
        out_of_time = config.max_minutes is not None and time.perf_counter() - start > 60 * config.max_minutes
        if step % config.eval_every == 0 or out_of_time:
            if not curve or curve[-1][0] != step:
                curve.append([step, sum(losses[-config.log_every :]) / len(losses[-config.log_every :])])
            acc = evaluate(step)
            last_stage = step > config.steps - config.stages[-1][0]
            if config.stop_accuracy is not None and acc >= config.stop_accuracy and last_stage:
                logger.info(
                    "stopping training at step %d: accuracy %.3f >= %s", step, acc, config.stop_accuracy
                )
                break
            if out_of_time:
                logger.info("stopping training at step %d: max_minutes=%s reached", step, config.max_minutes)
                break
    if not curve or curve[-1][0] != step:
        curve.append([step, sum(losses[-config.log_every :]) / len(losses[-config.log_every :])])
    if not accuracy or accuracy[-1][0] != step:
        evaluate(step)
    k = min(config.log_every, len(losses))
    history = {
        "steps": step,
        "wall_s": round(time.perf_counter() - start, 2),
        "cpu_s": round(time.process_time() - cpu_start, 2),
        "loss": curve,
        "accuracy": accuracy,
        "first_loss": sum(losses[:k]) / k,
        "last_loss": sum(losses[-k:]) / k,
        "config": asdict(config),
    }
    return model.eval(), history


@torch.inference_mode()
def mqar_accuracy(model, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Per-query correctness, bool ``[num_examples, N]`` (queries in position order): argmax == value."""
    out = []
    for i in range(0, inputs.shape[0], batch_size):
        logits, targets = label_logits(model, inputs[i : i + batch_size], labels[i : i + batch_size])
        out.append((logits.argmax(-1) == targets).view(min(batch_size, inputs.shape[0] - i), -1))
    return torch.cat(out)
