"""The one training step: score -> select -> forward -> loss terms -> kept-token normalisation.

:class:`CGGRStep` is plain PyTorch (no Lightning). :class:`~lightning_cggr.module.CGGRModule` wraps
it for the Trainer (logging, hooks, checkpoints); the benchmarks in ``experiments/`` drive the same
object through :func:`optimizer_step`, which performs exactly what Lightning's automatic
optimization does around ``training_step`` (a test compares the two, gradients and update).

One micro-batch (:meth:`CGGRStep.__call__`), all on the device and free of host syncs:

1. shift labels once into next-token targets (:func:`~.routing.selection.shift_targets`);
2. under ``no_grad``, the truncated router (the model's own first k blocks, final norm and head)
   yields per-token statistics, chunked over tokens;
3. :func:`decide`: a scorer turns them into difficulty and :func:`~.routing.selection.select` keeps
   the hardest ``min_tokens_ratio`` of the trainable tokens, as a static-size list of candidate rows
   plus a validity mask (one pure function; ``perf.compile_routing`` compiles it);
4. the decoder runs on every token (attention needs them all);
5. only the kept rows of the final hidden states go through the LM head and cross-entropy
   (``loss.impl``), as a NLL *sum* (each token's NLL times its loss weight, 1 for top-k) and a
   kept count;
6. :class:`~.distributed.KeptTokenNormalizer` turns the sum into the value to backprop; after the
   last micro-batch of an optimizer step, :meth:`CGGRStep.correct_gradients` rescales the
   gradients to the sum over the step's micro-batches and ranks divided by the step's summed
   normaliser: the kept-token count (top-k, stratified, noise_excluded) or the trainable-token count
   (importance, infobatch: the weighted sum is then unbiased for the full-token mean).

``cggr.enabled=false`` (and the first ``cggr.warmup_steps`` steps) run the same path keeping every
trainable token: the standard baseline.

Variants (options in ``conf/cggr/``):

- ``selection.unit=sequence``: only the ``ceil(ratio * B)`` hardest sequences (mean score over
  trainable tokens) are index-selected and run through the decoder, forward and backward.
- ``router.source=final``: no router; step 4 runs first and its final hidden states (detached,
  in training mode, so with the model's dropout) give the statistics. Token unit only.
- ``scoring=excess_loss``: score = current NLL - NLL of a frozen, unregistered reference model.
- ``scoring=random``: seeded uniform scores from a generator on the device seeded by (seed, step,
  micro-batch), the micro-batch's index among the optimizer step's on all ranks.
- ``ratio_schedule``: constant, curriculum (host ints) or dynamic (a device tensor; static buffers
  sized by its max).
- ``selection.strategy`` (either unit): ``importance`` (keep with probability p, weight 1/p),
  ``infobatch`` (drop below-mean units with probability ``prune``, weight the kept ones
  1/(1 - prune), nothing pruned in the last ``anneal_fraction`` of ``total_steps``) and
  ``noise_excluded`` (skip the hardest ``noise_fraction``, keep the ratio of the rest); draws from a
  (seed, step, micro-batch) generator, stream 2. Under static shapes infobatch saves no compute (its capacity
  is every unit); importance and noise_excluded keep the top-k capacity.

Each call returns its metrics as 0-d device tensors (``train/loss``, ``train/kept_ratio``,
``train/ratio``, ``train/score_kept``, ``train/score_dropped``, ``train/kept_sequences``, and for the
weighted rules ``train/weight_mean`` (mean loss weight of the kept units) and ``train/prune``);
nothing is read on the host.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, NamedTuple, Sequence

import torch

from .config import (CGGRConfig, LossConfig, OptimConfig, PerfConfig, as_config, config_error,
                     step_config_problems)
from .distributed import KeptTokenNormalizer
from .errors import ConfigError
from .kernels import TokenStats, linear_cross_entropy, resolve_impl, resolve_stats_impl
from .models.attention import mask_free_attention, model_configs
from .perf import (adamw_kwargs, apply_activation_checkpointing, auto_compile_off_because, compile_function,
                   compile_knob_problems, compile_model, mark_step_begin, resolve_compile, sdpa_backend_problem,
                   sdpa_scope)
from .routing.guards import sanitize_stats
from .routing.reference import ReferenceModel, load_reference
from .routing.router import TruncatedRouter, checked_logit_transform, find_decoder, find_head, mask_free_is_exact
from .routing.schedule import batch_confidence, dynamic_ratio, host_ratio
from .routing.rules import GENERATOR_STRATEGIES, choose_rows, choose_tokens, prune_in_force, rule_generator
from .routing.scoring import excess_loss_score, get_scorer, random_score, step_generator
from .routing.selection import IGNORE_INDEX, Selection, mask_labels, sample_positions, shift_targets

Metrics = dict[str, torch.Tensor]


class Routed(NamedTuple):
    """What the loss needs after routing, plus the routing metrics."""

    hidden: torch.Tensor
    """[B', T, H] final hidden states of the rows that ran (all rows, or the kept sequences)."""
    targets: torch.Tensor
    """[B', T] next-token targets of those rows (-100 where nothing is learned)."""
    selection: Selection | None
    """Token unit: which flat rows the head sees; None: every row of ``hidden``."""
    kept: torch.Tensor
    """[B, T] bool over the original batch: positions whose label trains this step."""
    metrics: Metrics
    weight: torch.Tensor | None = None
    """[B', T] fp32 loss weight per position of ``targets`` (weighted rules); None: weight 1."""
    normaliser: torch.Tensor | None = None
    """0-d long: what the weighted NLL sum is divided by (weighted rules); None: the kept count."""
    counts: Metrics | None = None
    """What each of ``metrics`` is a mean over (see :attr:`StepResult.counts`); None: nothing routed."""


@dataclass
class StepResult:
    """One micro-batch's outcome."""

    loss: torch.Tensor
    """The value to backprop (NLL sum scaled for the step's global kept-token mean)."""
    nll_sum: torch.Tensor
    """Sum of the kept tokens' loss (the NLL, plus loss.label_smoothing's and loss.z_loss's terms where
    set), each times its loss weight (device, fp32)."""
    kept: torch.Tensor
    """Number of kept tokens (device, int)."""
    metrics: Metrics = field(default_factory=dict)
    """0-d device tensors keyed by their logged names."""
    normaliser: torch.Tensor | None = None
    """What ``nll_sum`` is divided by: ``kept``, or for the unbiased weighted rules the trainable-token
    count (device, int); summed over micro-batches and ranks by the :class:`KeptTokenNormalizer`."""
    counts: Metrics = field(default_factory=dict)
    """How many entries each metric averages (tokens or sequences of this micro-batch, 0-d device
    tensors); a metric absent here counts 1 (``train/ratio``, ``train/prune``, ``train/kept_sequences``).
    An optimizer step's value of a metric is ``sum(value x count) / sum(count)`` over its micro-batches
    and ranks: e.g. ``train/kept_ratio`` is the step's kept tokens over its trainable tokens."""


class CGGRStep:
    """The training step of one model under one CGGR / loss setting; holds no Lightning state.

    ``model`` is a Hugging Face causal LM; it is referenced, never copied or registered here (the
    owner registers it). ``reference``: the frozen model of ``scoring=excess_loss``, given directly
    (else loaded from ``cggr.router.reference``); held unregistered, never trained or checkpointed.
    Decoder and head are looked up on the model at each use, so wrappers applied later (FSDP) are
    seen. ``perf``: efficiency options (:mod:`lightning_cggr.perf`); ``perf.compile`` compiles the
    model's decoder blocks (or its whole decoder: ``perf.compile_scope``) in place here (``auto`` by
    the model's device at this point: ``train()`` resolves it earlier, from the Trainer's device and
    strategy).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        cggr: CGGRConfig | Mapping | None = None,
        loss: LossConfig | Mapping | None = None,
        reference: torch.nn.Module | None = None,
        perf: PerfConfig | Mapping | None = None,
        total_steps: int | None = None,
    ):
        self.model = model
        self.total_steps = total_steps
        """The run's optimizer steps (``trainer.max_steps``): needed by strategy=infobatch's annealing."""
        self.cggr = as_config(cggr, CGGRConfig, "cggr")
        self.loss_cfg = as_config(loss, LossConfig, "loss")
        self.perf = as_config(perf, PerfConfig, "perf")
        if problems := step_config_problems(self.cggr, self.loss_cfg, self.perf,  # built from Python, unchecked
                                            reference_module=reference is not None):
            raise config_error(problems)
        self.logit_transform = checked_logit_transform(model)  # fails early on an unsupported architecture
        """What the model does after its head (softcap, scale): applied wherever logits are formed."""
        self._mask_free = mask_free_is_exact([model])  # probed before compiling: no graph made for it
        """Whether packed batches may take the mask-free causal path (the family's attention agrees)."""
        if self.logit_transform.softcap is not None and self.loss_cfg.impl == "torch_lce":
            raise ValueError(f"loss.impl=torch_lce cannot soft-cap the logits as {type(model).__name__} does "
                             f"(final_logit_softcapping={self.logit_transform.softcap:g}); use loss.impl=auto, "
                             "triton, torch, naive or liger")
        # perf.sdpa_backend: the attention implementation here, the device at the first micro-batch (the
        # model may still move: Lightning builds the module on the CPU)
        impl = getattr(model.config, "_attn_implementation", "sdpa")
        if problem := sdpa_backend_problem(self.perf.sdpa_backend, impl):
            raise ValueError(problem)
        self._sdpa_checked: set[tuple[str, bool]] = set()
        if self.perf.compile == "auto":  # by the model's device
            device = next(model.parameters()).device.type
            asked, self.perf = self.perf, dataclasses.replace(self.perf, compile=resolve_compile("auto", device))
            if problems := compile_knob_problems(asked, self.perf.compile, auto_compile_off_because(device, None, 1)):
                raise config_error(problems)
        elif problems := compile_knob_problems(self.perf, self.perf.compile):
            raise config_error(problems)
        apply_activation_checkpointing(model, self.perf.activation_checkpointing)  # before compiling: traced with it
        compile_model(model, self.perf.compile, self.perf.compile_backend, self.perf.compile_dynamic,
                      self.perf.compile_scope)
        c = self.cggr
        self._compiled_decide = None  # the routing decision compiled (perf.compile_routing; see decide)
        if (c.enabled and self.perf.compile_routing and c.selection.strategy not in GENERATOR_STRATEGIES
                and c.ratio_schedule.kind != "curriculum"):
            self._compiled_decide = compile_function(decide, self.perf.compile, self.perf.compile_backend)
        uses_router = c.enabled and c.router.source == "truncated" and c.scoring != "random"
        self.router = TruncatedRouter(model, c.router.num_layers) if uses_router else None
        self.reference = self._build_reference(reference) if c.enabled and c.scoring == "excess_loss" else None
        # the loss is the mean over the kept tokens of the whole optimizer step: all ranks, all
        # accumulated micro-batches (see lightning_cggr.distributed)
        self.token_norm = KeptTokenNormalizer()
        # configs that name the attention implementation (see attention_scope)
        models = [model] + ([self.reference.model] if self.reference is not None else [])
        self._attn_configs = model_configs(models)
        if self.reference is not None:
            self._mask_free = self._mask_free and mask_free_is_exact([self.reference.model])

    # ---- what the step runs on ----------------------------------------------------------------
    @property
    def decoder(self) -> torch.nn.Module:
        return find_decoder(self.model)

    @property
    def head(self) -> torch.nn.Linear:
        return find_head(self.model)

    @property
    def loss_impl(self) -> str:
        """The concrete loss kernel on the head's device (``loss.impl`` resolved)."""
        return resolve_impl(self.loss_cfg.impl, self.head.weight.device)

    @property
    def stats_impl(self) -> str:
        """The kernel for scoring statistics: the loss's where it has one; naive (full logits) scores
        with the chunked torch path, which never holds [tokens, vocab], and the peers (liger,
        torch_lce), which have no statistics kernel, with the device's own (``auto``)."""
        return resolve_stats_impl(self.loss_cfg.impl, self.head.weight.device)

    def _build_reference(self, model: torch.nn.Module | None) -> ReferenceModel:
        name, dtype = self.cggr.router.reference, self.cggr.router.reference_dtype
        if model is None:
            if not name:
                raise ValueError("scoring=excess_loss needs a reference model: set cggr.router.reference")
            model = load_reference(name, dtype)
        ref = ReferenceModel(model, dtype=getattr(torch, dtype))
        vocab = self.head.weight.shape[0]
        if ref.vocab_size != vocab:
            raise ValueError(f"reference model vocabulary {ref.vocab_size} != the trained model's {vocab}")
        return ref

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder's final (normed) hidden states, [B, T, H]."""
        with self.attention_scope(attention_mask, input_ids.shape[1]):
            return self.decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state

    def attention_scope(self, attention_mask: torch.Tensor | None, length: int | None = None):
        """Where decoders run on a batch without ``attention_mask`` (packed text: no padding) of
        ``length`` tokens, the mask-free causal attention of :mod:`lightning_cggr.models.attention`:
        transformers builds no mask, reads nothing back from the device and sdpa takes its causal
        kernel (not for a model whose sliding window or attention chunk is shorter than ``length``,
        nor for a family whose attention needs transformers' mask: :func:`~.routing.router.mask_free_is_exact`).
        Covers the model, the router's view (its own config copy) and the reference model. A
        host-side check of the argument, no sync; with a mask, transformers' own path runs unchanged."""
        if attention_mask is not None or not self._mask_free:
            return contextlib.nullcontext()
        views = self.router.view_configs if self.router is not None else []
        return mask_free_attention([*self._attn_configs, *views], length)

    # ---- schedule -----------------------------------------------------------------------------
    def active(self, global_step: int) -> bool:
        """Whether optimizer step ``global_step`` routes (a host-side int comparison: no sync)."""
        return self.cggr.enabled and global_step >= self.cggr.warmup_steps

    def ratio_in_force(self, global_step: int) -> float | None:
        """Host-side keep ratio of a step (1.0 in warmup); None for the dynamic (device) ratio."""
        c = self.cggr
        if not self.active(global_step):
            return 1.0
        q = c.ratio_schedule
        if q.kind == "dynamic":
            return None
        return host_ratio(q.kind, c.min_tokens_ratio, global_step, c.warmup_steps, q.steps, q.shape)

    # ---- scoring ------------------------------------------------------------------------------
    @torch.no_grad()
    def token_statistics(self, hidden: torch.Tensor, targets: torch.Tensor) -> TokenStats:
        """[B, T] fp32 ``TokenStats`` of ``hidden @ head.T`` against ``targets``, chunked, no grad."""
        B, T, H = hidden.shape
        stats = self.logit_transform.token_stats(hidden.detach().reshape(B * T, H), self.head, targets.reshape(-1),
                                                 impl=self.stats_impl, chunk_size=self.cggr.router.chunk_size)
        return type(stats)(*(s.view(B, T) for s in stats))

    @torch.no_grad()
    def raw_statistics(self, input_ids, attention_mask, targets, final_hidden: torch.Tensor | None = None):
        """``(stats, reference, scored)``: the model's ``TokenStats`` or None, the reference model's or
        None, and which positions they score. What scoring reads, before any sanitising. From
        ``final_hidden`` (router.source=final, the main forward's own output, detached) or else the
        truncated router; ``scoring=random`` reads no statistics. ``scored`` None: the statistics are
        [B, T], every position's; with ``router.score_stride`` s > 1 they are [B, ceil(T / s)], of every
        s-th trainable position of each row (:func:`~.routing.selection.sample_positions`), and
        ``scored`` is the [B, ceil(T / s)] mask of the slots that hold one."""
        c = self.cggr
        if c.scoring == "random":
            return None, None, None
        hidden = final_hidden if final_hidden is not None else self.router.hidden_states(input_ids, attention_mask)
        scored = positions = None
        if c.router.score_stride > 1:
            positions, scored = sample_positions(targets != IGNORE_INDEX, c.router.score_stride)
            hidden = hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
            targets_at = targets.gather(1, positions).masked_fill(~scored, IGNORE_INDEX)
        stats = self.token_statistics(hidden, targets if positions is None else targets_at)
        ref = None
        if c.scoring == "excess_loss":
            ref = self.reference.token_stats(
                input_ids, attention_mask, targets, impl=self.stats_impl, chunk_size=c.router.chunk_size
            )
            if positions is not None:
                ref = type(ref)(*(x.gather(1, positions) for x in ref))
        return stats, ref, scored

    def _random_score(self, targets, global_step: int, micro_batch: int = 0) -> torch.Tensor | None:
        """scoring=random: seeded uniform scores (a generator on the device: drawn eagerly); else None."""
        if self.cggr.scoring != "random":
            return None
        gen = step_generator(self.cggr.seed, global_step, targets.device, micro_batch=micro_batch)
        return random_score(targets != IGNORE_INDEX, gen)

    @torch.no_grad()
    def score_and_stats(
        self, input_ids, attention_mask, targets, global_step: int = 0, final_hidden: torch.Tensor | None = None,
        micro_batch: int = 0,
    ):
        """(difficulty, sanitized stats or None); -inf where nothing is to be learned. [B, T], or with
        ``router.score_stride`` > 1 at the sampled positions (see :meth:`raw_statistics` and
        :func:`score_tokens`)."""
        score = self._random_score(targets, global_step, micro_batch)
        if score is not None:
            return score, None
        stats, ref, scored = self.raw_statistics(input_ids, attention_mask, targets, final_hidden)
        return score_tokens(stats, targets != IGNORE_INDEX if scored is None else scored, self.cggr.scoring, ref)

    # ---- routing ----------------------------------------------------------------------------
    def route(self, input_ids, attention_mask, targets, global_step: int = 0, micro_batch: int = 0) -> Routed:
        """Score, select and run the decoder. ``micro_batch``: this micro-batch's index among the optimizer
        step's on all ranks (``rank x accumulate + i``), which seeds the random rules' draws with the step.

        Token unit: the decoder runs on every row and ``selection`` says which rows the head sees.
        Sequence unit: the decoder runs on the selected rows only (a static-size list); the
        returned hidden/targets are those rows' (invalid rows' targets ignored), ``selection`` None.
        The weighted rules also return per-position loss weights and the normaliser.
        """
        trainable = targets != IGNORE_INDEX
        c = self.cggr
        if not self.active(global_step):
            return Routed(self.hidden_states(input_ids, attention_mask), targets, None, trainable, {})
        hidden = None
        if c.router.source == "final":  # router-free: score from the forward's own final states (token unit)
            hidden = self.hidden_states(input_ids, attention_mask)
        score = self._random_score(targets, global_step, micro_batch)
        stats = ref = scored = None
        if score is None:
            stats, ref, scored = self.raw_statistics(input_ids, attention_mask, targets, final_hidden=hidden)
        choice, kept, metrics, counts = self.decide(stats, ref, score, trainable, scored, global_step, micro_batch)
        if c.selection.unit == "sequence":
            return self._run_sequences(input_ids, attention_mask, targets, choice, kept, metrics, counts)
        if hidden is None:
            hidden = self.hidden_states(input_ids, attention_mask)
        return Routed(hidden, targets, choice.selection, kept, metrics, choice.weight, choice.normaliser, counts)

    def decide(self, stats, reference, score, trainable, scored, global_step: int, micro_batch: int = 0):
        """:func:`decide` with this step's settings: compiled under ``perf.compile`` with
        ``perf.compile_routing=true``, except for the rules that draw from a generator and for a ratio
        curriculum, which decide eagerly."""
        c = self.cggr
        q = c.ratio_schedule
        ratio = self.ratio_in_force(global_step)  # None: the dynamic ratio, on the device
        generator = self._generator(global_step, trainable.device, micro_batch)
        fn = self._compiled_decide or decide
        return fn(stats, reference, score, trainable, scored, unit=c.selection.unit, scoring=c.scoring,
                  sel=c.selection, ratio=ratio, bounds=(q.min, q.max), cap=q.max if ratio is None else ratio,
                  generator=generator, prune=self._prune(global_step))

    def _run_sequences(self, input_ids, attention_mask, targets, rows, kept, metrics, counts) -> Routed:
        """Sequence unit: run the decoder on the chosen rows alone (see :meth:`route`)."""
        sub_ids = input_ids.index_select(0, rows.index)
        sub_mask = attention_mask.index_select(0, rows.index) if attention_mask is not None else None
        sub_targets = targets.index_select(0, rows.index).masked_fill(~rows.valid.unsqueeze(1), IGNORE_INDEX)
        hidden = self.hidden_states(sub_ids, sub_mask)
        weight = None if rows.weight is None else rows.weight.unsqueeze(1).expand(sub_targets.shape)
        return Routed(hidden, sub_targets, None, kept, metrics, weight, rows.normaliser, counts)

    def _generator(self, global_step: int, device, micro_batch: int = 0) -> torch.Generator | None:
        return rule_generator(self.cggr.selection.strategy, self.cggr.seed, global_step, device, micro_batch)

    def _prune(self, global_step: int) -> float | None:
        """strategy=infobatch: the prune fraction in force (see :func:`~.routing.rules.prune_in_force`)."""
        if self.cggr.selection.strategy != "infobatch":
            return None
        return prune_in_force(self.cggr.selection, global_step, self.total_steps)

    # ---- loss ---------------------------------------------------------------------------------
    def loss_terms(
        self, hidden: torch.Tensor, targets: torch.Tensor, selection: Selection | None,
        weight: torch.Tensor | None = None, objective: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss sum, kept count) over kept tokens, both device tensors; the LM head runs on kept rows
        only (except naive). The count is of the very labels the loss saw, so the two always agree.
        The loss is each token's NLL, plus (``objective``: the training loss) ``loss.label_smoothing``
        and ``loss.z_loss`` where set; ``objective=False`` is the plain NLL (validation).

        ``weight`` ([B, T] like ``targets``, fp32, no grad): each token's loss is multiplied by it
        (the weighted rules' ``1/p`` or ``1/(1 - prune)``); None is weight 1.
        """
        B, T, H = hidden.shape
        impl = self.loss_impl
        flat_h = hidden.reshape(B * T, H)
        flat_y = targets.reshape(-1)
        flat_w = None if weight is None else weight.reshape(-1)
        if selection is not None:
            if impl == "naive":  # HF-style: full logits, easy labels masked
                flat_y = mask_labels(targets, selection.keep).reshape(-1)
            else:  # gather the static-size candidate rows; padding rows are ignored
                flat_h = flat_h.index_select(0, selection.index)
                flat_y = flat_y.index_select(0, selection.index).masked_fill(~selection.valid, IGNORE_INDEX)
                flat_w = None if flat_w is None else flat_w.index_select(0, selection.index)
        flat_h, weight, bias = self.logit_transform.operands(flat_h, self.head)
        terms = ({"label_smoothing": float(self.loss_cfg.label_smoothing), "lse_square_scale": float(self.loss_cfg.z_loss)}
                 if objective else {})
        nll_sum = weighted_nll_sum(flat_h, weight, flat_y, flat_w, impl, bias=bias, chunk_size=self.loss_cfg.chunk_size,
                                   grad_accum=self.loss_cfg.grad_accum, softcap=self.logit_transform.softcap, **terms)
        return nll_sum, (flat_y != IGNORE_INDEX).sum()

    def __call__(self, batch: dict, global_step: int, world_size: int = 1, micro_batch: int = 0) -> StepResult:
        """One micro-batch: route, loss terms and the value to backprop (see the module docstring).
        ``micro_batch``: its index among the optimizer step's micro-batches on all ranks (``rank x
        accumulate + i``): the random rules draw from (seed, step, micro_batch), so each rank and each
        accumulated micro-batch makes its own draw, as one larger batch would."""
        mark_step_begin(self.perf.compile)
        with self.sdpa_scope(batch), self.attention_scope(batch.get("attention_mask"), batch["input_ids"].shape[1]):
            return self._micro_batch(batch, global_step, world_size, micro_batch)

    def sdpa_scope(self, batch: dict):
        """:func:`~lightning_cggr.perf.sdpa_scope` of ``perf.sdpa_backend``, after checking on the host
        that the kernel runs on the batch's device and takes its mask (a padded batch, once per kind)."""
        kind = (batch["input_ids"].device.type, batch.get("attention_mask") is not None)
        if kind not in self._sdpa_checked:
            impl = getattr(self.model.config, "_attn_implementation", "sdpa")
            if problem := sdpa_backend_problem(self.perf.sdpa_backend, impl, *kind):
                raise ValueError(problem)
            self._sdpa_checked.add(kind)
        return sdpa_scope(self.perf.sdpa_backend)

    def _micro_batch(self, batch: dict, global_step: int, world_size: int, micro_batch: int = 0) -> StepResult:
        input_ids, attention_mask = batch["input_ids"], batch.get("attention_mask")
        targets = shift_targets(batch["labels"], attention_mask)
        trainable = targets != IGNORE_INDEX
        routed = self.route(input_ids, attention_mask, targets, global_step, micro_batch)
        nll_sum, n_kept = self.loss_terms(routed.hidden, routed.targets, routed.selection, routed.weight)
        # top-k: the mean over kept tokens; the unbiased rules: over every trainable token (sampling.py)
        normaliser = n_kept if routed.normaliser is None else routed.normaliser
        loss = self.token_norm.loss(nll_sum, normaliser, world_size)  # exact global mean after correct_gradients
        n_trainable = trainable.sum()
        metrics = {
            "train/loss": nll_sum.detach() / normaliser.clamp(min=1),  # this micro-batch's (estimated) mean
            "train/kept_ratio": routed.kept.sum() / n_trainable.clamp(min=1),
            **routed.metrics,
        }
        counts = {"train/loss": normaliser, "train/kept_ratio": n_trainable, **(routed.counts or {})}
        return StepResult(loss, nll_sum, n_kept, metrics, normaliser, counts)

    def correct_gradients(self, params: Iterable[torch.nn.Parameter], accumulate: int,
                          extra: torch.Tensor | None = None) -> torch.Tensor | None:
        """Once per optimizer step, after the last backward, before clipping: gradients become
        those of the mean over the step's kept tokens on every rank. Returns that count (device).
        ``extra``: sums to add up over the ranks in the same all-reduce (see
        :meth:`KeptTokenNormalizer.correct_gradients`)."""
        return self.token_norm.correct_gradients(params, accumulate, extra)

    @torch.no_grad()
    def eval_terms(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(NLL sum, token count) over every trainable token of ``batch``: held-out loss, the same
        for every method."""
        mark_step_begin(self.perf.compile)
        input_ids, attention_mask = batch["input_ids"], batch.get("attention_mask")
        targets = shift_targets(batch["labels"], attention_mask)
        with self.sdpa_scope(batch):
            return self.loss_terms(self.hidden_states(input_ids, attention_mask), targets, None, objective=False)


def weighted_nll_sum(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, row_weight: torch.Tensor | None, impl: str,
    **kernel_options,
) -> torch.Tensor:
    """``sum_i row_weight_i * NLL_i`` over the rows whose label is not ignored (``row_weight`` None: 1);
    the weights (detached: they are estimator weights, not parameters) go into the loss kernel."""
    rw = None if row_weight is None else row_weight.detach().float()
    return linear_cross_entropy(hidden, weight, labels, reduction="sum", impl=impl, row_weight=rw, **kernel_options)


def score_tokens(stats: TokenStats, trainable: torch.Tensor, scoring: str, reference: TokenStats | None = None):
    """([B, T] difficulty, sanitized stats) from the raw statistics of ``scoring`` (not ``random``):
    non-finite statistics never rank hard (routing.guards); ``excess_loss`` subtracts ``reference``'s NLL."""
    stats, finite = sanitize_stats(stats)
    usable = trainable & finite
    if scoring == "excess_loss":
        return excess_loss_score(stats, usable, reference), stats
    return get_scorer(scoring)(stats, usable), stats


def decide(stats, reference, score, trainable, scored=None, *, unit: str, scoring: str, sel, ratio: float | None,
           bounds: tuple[float, float], cap: float, generator, prune: float | None):
    """Scoring to choice for one routed micro-batch: ``(choice, kept, metrics, counts)``, device tensors
    only (``counts``: what each metric averages, see :attr:`StepResult.counts`).

    ``stats``/``reference``: the raw statistics (:meth:`CGGRStep.raw_statistics`), or ``score`` given
    (``scoring=random``). ``trainable``: the batch's [B, T] positions with a label; ``scored``: the
    mask of the positions the statistics score when they are a sample (``router.score_stride``,
    sequence unit, top-k), else None (every trainable position). ``ratio``: the host ratio in force,
    or None for the dynamic ratio (from the batch's confidence, within ``bounds``); ``cap`` the host
    ratio sizing the static buffers.
    ``choice`` is a :class:`~.routing.rules.TokenChoice` (token unit) or a
    :class:`~.routing.rules.RowChoice`; ``kept`` the [B, T] positions whose label trains.

    A pure function of tensors and host values with static shapes: under ``perf.compile`` with
    ``perf.compile_routing=true`` the step compiles it (one graph of a few fused kernels instead of
    about a hundred eager ops, each a launch on a GPU). Not compiled: the rules that draw from a
    device generator (:data:`~.routing.rules.GENERATOR_STRATEGIES`; dynamo does not trace
    generators), and a ratio curriculum, whose keep ratio sizes the buffers: a new size every step
    would be a new graph every step (torch specializes the capacity's host arithmetic), until torch
    gave up and ran it eagerly anyway.
    """
    mask = trainable if scored is None else scored
    if score is None:
        score, stats = score_tokens(stats, mask, scoring, reference)
    if ratio is None:
        ratio = dynamic_ratio(batch_confidence(stats, mask & torch.isfinite(score)), *bounds)
    if unit == "token":
        choice = choose_tokens(sel, score, trainable, ratio, cap, generator, prune)
        keep = choice.selection.keep
        means, counts = _score_means(score, keep, trainable & ~keep)
        if "train/weight_mean" in choice.metrics:  # the weights' mean over the kept tokens
            counts["train/weight_mean"] = keep.sum()
        return choice, keep, {**choice.metrics, **means}, counts
    rows = choose_rows(sel, score, mask, ratio, cap, generator, prune)
    row_kept = torch.zeros(trainable.shape[0], dtype=torch.bool, device=trainable.device)
    row_kept.index_copy_(0, rows.index, rows.valid)  # index entries are distinct
    has = trainable.any(dim=1)
    means, counts = _score_means(rows.score, row_kept, has & ~row_kept)
    if "train/weight_mean" in rows.metrics:  # over the kept rows
        counts["train/weight_mean"] = rows.valid.sum()
    metrics = {**rows.metrics, **means, "train/kept_sequences": rows.valid.sum().float()}
    return rows, trainable & row_kept.unsqueeze(1), metrics, counts


def _score_means(score: torch.Tensor, kept: torch.Tensor, dropped: torch.Tensor) -> tuple[Metrics, Metrics]:
    """Mean score of kept vs dropped entries (tokens or sequences), and how many each mean is over,
    as device tensors."""
    zero = torch.zeros((), dtype=torch.float32, device=score.device)
    means, counts = {}, {}
    for mask, name in ((kept, "kept"), (dropped, "dropped")):
        total = torch.where(mask, score.float(), zero).sum()
        counts[f"train/score_{name}"] = n = mask.sum()
        means[f"train/score_{name}"] = total / n.clamp(min=1)
    return means, counts


# ---- optimizer, schedule and the optimizer step outside Lightning --------------------------------


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, *, scaled_clipping: bool = False) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (embeddings and linear weights), none on norms and
    biases; ``cfg.fused`` picks torch's implementation (:func:`lightning_cggr.perf.adamw_kwargs`;
    ``scaled_clipping``: gradients are clipped under a loss scaler, which a fused step cannot allow).
    Build it after the model is on its device (Lightning's ``configure_optimizers`` is)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    try:
        impl = adamw_kwargs([*decay, *no_decay], cfg.fused, scaled_clipping=scaled_clipping)
    except ValueError as err:
        raise ConfigError(f"invalid configuration: {err}") from None
    try:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), **impl)
    except RuntimeError as err:
        if not impl.get("fused"):
            raise
        where = sorted({f"{p.device.type} {p.dtype}" for p in (*decay, *no_decay)})
        raise ConfigError(
            f"invalid configuration: optim.fused=true, but torch has no fused AdamW for these parameters "
            f"({', '.join(where)}): {' '.join(str(err).split())}; use optim.fused=auto"
        ) from None


def lr_factor(step: int, cfg: OptimConfig, total_steps: int | None) -> float:
    """The LR multiplier at optimizer step ``step``: linear warm-up from 0 over ``warmup_steps``
    (capped at ``total_steps``), then a half cosine down to ``min_lr_ratio`` at ``total_steps``,
    held there after (a run continued past its planned length keeps the floor). ``total_steps=None``
    (a run of unknown length): the warm-up, then ``min_lr_ratio`` must be 1, a constant LR."""
    if total_steps is None:
        if cfg.min_lr_ratio != 1.0:
            raise ValueError(f"a cosine down to min_lr_ratio={cfg.min_lr_ratio} needs the run's length")
        return step / cfg.warmup_steps if step < cfg.warmup_steps else 1.0
    total = max(int(total_steps), 1)
    warmup = min(int(cfg.warmup_steps), total)
    if step < warmup:
        return step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine(torch.optim.lr_scheduler.LambdaLR):
    """:func:`lr_factor` as a ``LambdaLR``, stepped once per optimizer step.

    Loading a checkpoint's state sets the learning rates to this schedule's at the restored step. A
    run continued with a new ``trainer.max_steps`` builds its schedule for the new length, but the
    optimizer's state brings back the old schedule's last rates, and a ``LambdaLR`` recomputes them
    only at its next step: the first step after the resume trained at the old rate (at the floor,
    for a run that had finished). With the same length the rates are the ones stored, bit for bit."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int | None):
        super().__init__(optimizer, lambda step: lr_factor(step, cfg, total_steps))

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for group, base, factor in zip(self.optimizer.param_groups, self.base_lrs, self.lr_lambdas):
            group["lr"] = base * factor(self.last_epoch)  # LambdaLR's own expression
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int | None) -> WarmupCosine:
    """The run's LR schedule (see :class:`WarmupCosine`)."""
    return WarmupCosine(optimizer, cfg, total_steps)


def autocast_for(precision: str, device: torch.device | str):
    """The forward context Lightning uses for ``trainer.precision``: ``32-true`` or ``bf16-mixed``."""
    p = str(precision)
    if p in ("32-true", "32"):
        return contextlib.nullcontext()
    if p == "bf16-mixed":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    raise ValueError(f"the Trainer-free driver supports trainer.precision 32-true or bf16-mixed, not {p!r}")


def optimizer_step(
    step: CGGRStep,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[dict],
    global_step: int,
    *,
    scheduler=None,
    clip: float | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> list[StepResult]:
    """One optimizer step without Lightning, in the order Lightning's automatic optimization uses:
    each micro-batch's step, its loss divided by the number of micro-batches and backpropagated;
    then :meth:`CGGRStep.correct_gradients` (the module's ``on_before_optimizer_step``), norm
    clipping of all gradients, the optimizer step, ``zero_grad`` and the LR scheduler step."""
    params = [p for p in step.model.parameters() if p.requires_grad]
    k = len(micro_batches)
    results = []
    for i, batch in enumerate(micro_batches):  # one process: micro-batch i draws as rank 0's i-th would
        with autocast():
            res = step(batch, global_step, micro_batch=i)
        (res.loss / k).backward()
        results.append(res)
    step.correct_gradients(params, k)
    if clip:
        torch.nn.utils.clip_grad_norm_(params, clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:
        scheduler.step()
    return results
