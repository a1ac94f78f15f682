"""The contract every sparse-attention method follows, and the registry of methods by name.

A method is a small dataclass of parameters (validated in ``__post_init__``) with one selection
function, :meth:`SparseMethod.block_mask`, that turns a prefill's queries and keys into a
:class:`~sparse_llm.kernels.BlockMask`. A method that approximates the keys its mask leaves out also
overrides :meth:`SparseMethod.far_field`. :meth:`SparseMethod.attend` is shared: the kernel over the
mask, plus the far field merged by log-sum-exp (:func:`~sparse_llm.kernels.merge_attention`).

The common options (``block_size``, ``min_seq_len``, ``dense_layers``, ``decode``) live here and are
applied once, by the Hugging Face patch, for every method (kvpress's ``BasePress`` shape).
"""

from __future__ import annotations

import logging
import types
import typing
import warnings
from dataclasses import dataclass, field, fields
from typing import ClassVar

import torch

from sparse_llm.backends._collapse import FAR_SPAN, mean_far_field
from sparse_llm.backends.selection import first_real_key, key_blocks_with_real_keys
from sparse_llm.kernels import BlockMask, block_sparse_attention, merge_attention, merge_attention_
from sparse_llm.names import unknown_name

logger = logging.getLogger(__name__)

DECODE_MODES = ("dense", "sparse")
BUDGETED_FAR_KEYS = ("none", "mean")
WHOLE_PROMPT = 1 << 20  # tokens: a budget or window this large covers any prompt the tests use
MAX_BLOCK_SIZE = 4096  # tokens: larger blocks pad a prompt to a whole block and select nothing useful


class ParameterTypeError(TypeError, ValueError):
    """A method parameter of the wrong type. A TypeError, and a ValueError too, so that code which
    catches a method's ValueError for bad settings catches this one as well."""


@dataclass(frozen=True)
class LayerCall:
    """What the patch knows about one attention call, beyond q/k/v.

    ``key_padding_mask`` is ``[B, Tk]`` bool (True = real token) or None; ``sliding_window`` is the
    layer's own window (Gemma local layers) or None; ``softcap`` the logit soft-cap or None.

    Queries are the last Tq of the Tk key positions (bottom-right), whether the call is a whole
    prompt (Tq = Tk), one chunk of a chunked prefill (1 < Tq < Tk, the keys before it from the cache)
    or a decode step (Tq = 1). ``prompt_continues`` is True when the caller said more prompt tokens
    follow this call (every chunk but the last of :func:`sparse_llm.prefill`); what belongs to the
    end of the prompt (the dense tail) is then left out.
    """

    layer_idx: int
    scale: float
    softcap: float | None = None
    sliding_window: int | None = None
    key_padding_mask: torch.Tensor | None = None
    prompt_continues: bool = False


@dataclass
class SparseMethod:
    """Base of all methods: the options every method accepts.

    Args:
        block_size: query and key block size of the kernel (power of two).
        min_seq_len: prefill calls whose context (keys, a chunk's cached ones included) is shorter
            than this run dense.
        dense_layers: layer indices that always run dense.
        decode: ``"dense"`` (default) runs single-token decode steps at full density;
            ``"sparse"`` applies the method's selection to them too.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    # Settings that the registry-driven tests (tests/test_method_contract.py) and the bench read, so a
    # new method file is tested and benchmarked without being named anywhere else. Read-only dicts.
    # exact_params: parameters at which the method equals ``dense`` on a short prompt; None (with the
    #   reason in a comment) if no setting is exact. The default {} claims exactness at the defaults:
    #   a method for which that is false fails the contract test until it declares its own.
    # small_params: a setting that really sparsifies a ~160-token prompt; None if never sparse.
    # bench_params: the bench's defaults (``sparse-llm bench``), overridden by its method_params.
    exact_params: ClassVar[dict | None] = {}
    small_params: ClassVar[dict | None] = {"block_size": 16}
    bench_params: ClassVar[dict] = {}
    # Renamed parameters, old name -> new: get_method still accepts the old one, with a DeprecationWarning.
    renamed_params: ClassVar[dict[str, str]] = {}

    block_size: int = 64
    min_seq_len: int = 0
    dense_layers: tuple[int, ...] = field(default_factory=tuple)
    decode: str = "dense"

    def __post_init__(self) -> None:
        check_field_types(self)
        if (
            self.block_size < 16
            or self.block_size > MAX_BLOCK_SIZE
            or self.block_size & (self.block_size - 1)
        ):
            raise ValueError(
                f"block_size must be a power of two in [16, {MAX_BLOCK_SIZE}], got {self.block_size!r}"
            )
        if self.min_seq_len < 0:
            raise ValueError(f"min_seq_len must be a non-negative int, got {self.min_seq_len!r}")
        if self.decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {DECODE_MODES}, got {self.decode!r}")
        self.dense_layers = _layer_indices(self.dense_layers)

    def params(self) -> dict:
        """The method's parameters as a plain dict (for result files)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def layer_stats(self) -> dict[int, dict]:
        """Per layer, figures of its most recent call beyond the mask's density (a far field's size),
        written by the methods that have them; :func:`sparse_llm.attention_stats` reports them."""
        return self.__dict__.setdefault("_layer_stats", {})

    def block_mask(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: LayerCall) -> BlockMask:
        """Select the blocks each query block attends.

        q ``[B, Hq, Tq, D]``, k and v ``[B, Hkv, Tk, D]`` (keys with RoPE applied, GQA not expanded).
        """
        raise NotImplementedError

    def far_field(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockMask, call: LayerCall
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Attention over the causal, real keys that ``mask`` leaves out, or None (the default) when the
        method attends its blocks only.

        Returns ``(out [B, Hq, Tq, D], lse [B, Hq, Tq] float32)`` in the kernel's convention (STYLE.md
        section 2): ``out * exp(lse)`` is the part's unnormalized sum; a row without far keys gives
        out 0 and lse -inf. Windowed layers never reach a method: the patch runs them dense.
        """
        return None

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: LayerCall
    ) -> tuple[torch.Tensor, BlockMask]:
        """Attention output ``[B, Hq, Tq, D]`` and the mask of its exact part: the kernel over
        :meth:`block_mask`'s blocks, merged by log-sum-exp with :meth:`far_field` if it returns one.

        Methods override ``block_mask`` and ``far_field``, not this."""
        self.layer_stats().pop(call.layer_idx, None)  # a call without a far field reports none
        mask = self.block_mask(q, k, v, call)
        far = self.far_field(q, k, v, mask, call)
        if far is None:
            return exact_attention(q, k, v, mask, call), mask
        out, lse = exact_attention(q, k, v, mask, call, return_lse=True)
        if out.dtype != torch.float32:  # low precision: merge in fp32, round once
            return merge_attention(out, lse, *far)[0], mask
        merge_attention_(out, lse, *far)  # the kernel's fresh output: no temporary, no copy
        return out, mask


@dataclass
class BudgetedMethod(SparseMethod):
    """A selection method that attends ``budget`` tokens per query block, sinks and window included.

    The common knob of the selection methods, so that they compare at equal cost. The first
    ``sink_tokens`` real tokens and the ``local_tokens`` most recent ones are always kept
    (:meth:`forced_blocks`) and count towards the budget. The last ``dense_tail_blocks`` query
    blocks (the question at the end of a prompt) attend every causal key; those rows are part of the
    mask, so the density that :func:`sparse_llm.attention_stats` reports counts them.

    ``far_keys="mean"`` adds a far field over every causal key the selection leaves out: each
    ``far_group`` consecutive keys of an unselected block become one mean key with bias log n and
    their mean value (NSA's compression branch, no training), merged with the exact blocks by
    log-sum-exp. It keeps what diffuse heads spread over the whole context (a selection keeps only
    part of their mass) at ``1 / far_group`` of the left-out keys' cost; ``attention_stats`` reports
    it per layer as ``far_density``. It is the default: on RULER at 4K it lifts every selection
    method from 0.55 to 0.75-0.90 (sdpa 0.80), more than the same cost spent on a larger budget
    (docs/evaluations.md). ``"none"`` attends the selected blocks only (faster, forgets more).
    ``far_span`` (tokens, a multiple of ``block_size``; default 8192) makes the groups grow with
    distance: ``far_group`` keys within ``far_span`` tokens of the queries, then 4x larger groups per
    level (:func:`~sparse_llm.backends._collapse.far_levels`), so a query reads O(log T) mean keys
    beyond ``far_span`` instead of O(T). Prompts up to ``far_span`` tokens read one level. The default
    keeps the fine groups to 8K, where they keep the most needles (a shorter span loses some on RULER
    at 4K and 8K), and at 16K finds the needles that fine groups over the whole context lose; at 32K
    it halves the far reads (docs/evaluations.md). ``None``: one level at any length.

    Chunked prefill: sinks, windows and budgets are placed at each query block's absolute position,
    so a chunk whose start is a multiple of ``block_size`` keeps the whole prompt's block grid. The
    dense tail belongs to the end of the prompt: only a call that may end it gets one. A call marked
    ``prompt_continues`` (the chunks :func:`sparse_llm.prefill` knows are not the last) has none; a
    plain forward cannot be told apart from the last chunk, so under ``generate(...,
    prefill_chunk_size=N)`` every chunk's last blocks are dense (the reported density counts them).
    """

    exact_params: ClassVar[dict | None] = {"budget": WHOLE_PROMPT}  # every reachable block is kept
    small_params: ClassVar[dict | None] = dict(block_size=16, budget=64, sink_tokens=16, local_tokens=32)
    bench_params: ClassVar[dict] = {"budget": 2048}

    budget: int = 2048
    sink_tokens: int = 64
    local_tokens: int = 512
    dense_tail_blocks: int = 1
    far_keys: str = "mean"
    far_group: int = 4
    far_span: int | None = FAR_SPAN

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive(budget=self.budget, sink_tokens=self.sink_tokens, local_tokens=self.local_tokens)
        if self.far_keys not in BUDGETED_FAR_KEYS:
            raise ValueError(f"far_keys must be one of {BUDGETED_FAR_KEYS}, got {self.far_keys!r}")
        check_far_group(self.far_group, self.block_size, self.far_span)
        if self.budget < self.sink_tokens + self.local_tokens:
            raise ValueError(
                f"budget ({self.budget}) must cover sink_tokens + local_tokens "
                f"({self.sink_tokens} + {self.local_tokens}); raise the budget or shrink the window"
            )
        if (
            not isinstance(self.dense_tail_blocks, int)
            or isinstance(self.dense_tail_blocks, bool)
            or self.dense_tail_blocks < 0
        ):
            raise ValueError(f"dense_tail_blocks must be an int >= 0, got {self.dense_tail_blocks!r}")

    def far_field(self, q, k, v, mask: BlockMask, call: LayerCall):
        """With ``far_keys="mean"``, the mean-key far field over the blocks ``mask`` leaves out."""
        if self.far_keys == "none":
            return None
        out, lse, stats = mean_far_field(q, k, v, mask, call, self.far_group, self.far_span)
        self.layer_stats()[call.layer_idx] = stats
        return out, lse

    @property
    def budget_blocks(self) -> int:
        return -(-self.budget // self.block_size)

    def forced_blocks(self, q: torch.Tensor, k: torch.Tensor, call: LayerCall) -> torch.Tensor:
        """Sink and local blocks of every query block, bool ``[B or 1, 1, nQ, nK]``; with left padding,
        sinks start at a row's first real key and blocks holding only padding are left out.

        A budget at or above the context is clamped to it (every block is kept: exact attention), with
        one logged warning per method object, since the user probably meant a sparser setting."""
        if (
            self.budget >= k.shape[2]
            and q.shape[2] > 1
            and not call.prompt_continues  # an early chunk sees a short context, the prompt may not
            and not self.__dict__.get("_warned_budget")
        ):
            self.__dict__["_warned_budget"] = True
            logger.warning(
                "%s: budget %d >= context length %d, so every key is kept (exact attention); "
                "lower the budget to sparsify",
                self.name,
                self.budget,
                k.shape[2],
            )
        forced = BlockMask.sink_window(
            q_len=q.shape[2],
            kv_len=k.shape[2],
            block_q=self.block_size,
            block_k=self.block_size,
            sink_tokens=self.sink_tokens,
            local_tokens=self.local_tokens,
            device=q.device,
            kv_start=first_real_key(call.key_padding_mask),
        ).to_dense()
        real = key_blocks_with_real_keys(call.key_padding_mask, k.shape[2], self.block_size)
        # The local window of a padded row's first query blocks would reach into its padding.
        return forced if real is None else forced & real[:, None, None, :]

    def mask_from_blocks(
        self, selected: torch.Tensor, q: torch.Tensor, k: torch.Tensor, call: LayerCall
    ) -> BlockMask:
        """The BlockMask of a bool ``[B, H, nQ, nK]`` selection (H = 1, Hkv or Hq) with the dense tail
        rows added (unless ``call.prompt_continues``); blocks the causal geometry masks are dropped."""
        if self.dense_tail_blocks and not call.prompt_continues:
            real = key_blocks_with_real_keys(call.key_padding_mask, k.shape[2], self.block_size)
            if real is None:
                selected = selected.clone()
                selected[:, :, -self.dense_tail_blocks :] = True
            else:  # padding keys are never selected, dense rows included
                selected = selected.expand(real.shape[0], *selected.shape[1:]).clone()
                selected[:, :, -self.dense_tail_blocks :] = real[:, None, None, :]
        return BlockMask.from_dense(
            selected,
            block_q=self.block_size,
            block_k=self.block_size,
            q_len=q.shape[2],
            kv_len=k.shape[2],
            sliding_window=call.sliding_window,
        )

    def mask_from_scores(
        self, scores: torch.Tensor, q: torch.Tensor, k: torch.Tensor, call: LayerCall
    ) -> BlockMask:
        """Per row of float ``[B, H, nQ, nK]`` block scores, the forced (sink + local) blocks and then the
        highest-scoring reachable blocks, ``budget_blocks`` in all (ties to the lower block index), plus
        the dense tail. Non-finite (-inf) scores are never picked to fill the budget."""
        forced = self.forced_blocks(q, k, call)
        scores = scores.float().masked_fill(forced, float("inf"))
        ranked = BlockMask.from_topk(
            scores,
            self.budget_blocks,
            block_q=self.block_size,
            block_k=self.block_size,
            q_len=q.shape[2],
            kv_len=k.shape[2],
            sliding_window=call.sliding_window,
        ).to_dense()
        return self.mask_from_blocks(ranked & (scores > float("-inf")), q, k, call)


def exact_attention(q, k, v, mask: BlockMask, call: LayerCall, return_lse: bool = False):
    """The shared kernel over ``mask`` with the layer's scale, softcap, window and padding."""
    return block_sparse_attention(
        q,
        k,
        v,
        mask,
        scale=call.scale,
        softcap=call.softcap,
        sliding_window=call.sliding_window,
        key_padding_mask=call.key_padding_mask,
        return_lse=return_lse,
    )


def check_far_group(far_group: int, block_size: int, far_span: int | None = None) -> None:
    """``far_group`` (keys per mean key of a far field) must be a power of two <= ``block_size``;
    ``far_span`` (tokens before the groups first grow) None or a positive multiple of ``block_size``."""
    if far_span is not None and (
        not isinstance(far_span, int) or isinstance(far_span, bool) or far_span < 1 or far_span % block_size
    ):
        raise ValueError(
            f"far_span must be None or a positive multiple of block_size ({block_size}), got {far_span!r}"
        )
    if (
        not isinstance(far_group, int)
        or isinstance(far_group, bool)
        or far_group < 1
        or far_group & (far_group - 1)
        or far_group > block_size
    ):
        raise ValueError(f"far_group must be a power of two <= block_size ({block_size}), got {far_group!r}")


def check_field_types(method: SparseMethod) -> None:
    """Raise a ParameterTypeError naming the first parameter whose value does not match its annotation,
    for annotations made of int, float, bool, str and dict (and None in a union); others are left to the
    method. An int is a float here, a bool is not an int."""
    try:
        hints = typing.get_type_hints(type(method))
    except NameError:  # an annotation that names something out of scope (a method defined in a function)
        return
    for f in fields(method):
        allowed = _simple_types(hints.get(f.name))
        value = getattr(method, f.name)
        if allowed and not any(_is_instance(value, t) for t in allowed):
            names = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
            raise ParameterTypeError(f"{method.name}: {f.name} must be {names}, got {value!r}")


def _simple_types(hint) -> tuple[type, ...] | None:
    args = (
        typing.get_args(hint)
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
        else (hint,)
    )
    simple = (int, float, bool, str, dict, type(None))
    return tuple(args) if args and all(t in simple for t in args) else None


def _is_instance(value, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _layer_indices(layers) -> tuple[int, ...]:
    """``dense_layers`` as a tuple of layer indices (ints >= 0); the patch checks them against the model."""
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise ParameterTypeError(f"dense_layers must be a sequence of layer indices, got {layers!r}")
    layers = tuple(layers)
    bad = [i for i in layers if not _is_instance(i, int) or i < 0]
    if bad:
        raise ValueError(
            f"dense_layers must hold layer indices (ints >= 0, counted from the first layer), got {bad}"
        )
    return layers


def require_positive(**values: int) -> None:
    """Raise a ValueError naming the first argument that is not a positive int."""
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{key} must be a positive int, got {value!r}")


_REGISTRY: dict[str, type[SparseMethod]] = {}


def register_method(cls: type[SparseMethod]) -> type[SparseMethod]:
    """Class decorator: make a method available by its ``name`` (to :func:`get_method`, ``sparsify``,
    the CLI and the contract tests). Works on a class defined anywhere: a ``SparseMethod`` dataclass
    with ``name``, ``description`` and ``block_mask`` (plus ``far_field`` if it approximates)."""
    if not isinstance(cls, type) or not issubclass(cls, SparseMethod):
        raise TypeError(f"register_method takes a SparseMethod subclass (a class), got {cls!r}")
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"method name {cls.name!r} is empty or already registered")
    _REGISTRY[cls.name] = cls
    return cls


def list_methods() -> dict[str, str]:
    """Registered method names with one-line descriptions."""
    return {name: cls.description for name, cls in sorted(_REGISTRY.items())}


def get_method(name: str, **params) -> SparseMethod:
    """Instantiate a registered method; unknown names raise a ValueError listing the known ones."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise unknown_name("method", name, sorted(_REGISTRY))
    cls = _REGISTRY[name]
    for old, new in cls.renamed_params.items():
        if old in params:
            warnings.warn(f"{name}: parameter {old!r} is now {new!r}", DeprecationWarning, stacklevel=2)
            params[new] = params.pop(old)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"method {name!r} got unknown parameters {unknown}; it accepts {sorted(known)}")
    return cls(**params)
