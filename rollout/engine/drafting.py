"""Cost-aware drafting: how many pre-draft levels each decode step carries (DESIGN.md section 6).

A TiDAR step costs more than an AR step (every pre-draft level adds a block of mask tokens per
row) and pays back only through accepted drafts. Which choice wins depends on the batch, the
context, the acceptance rate and the device, so the engine chooses per step, among:
    None                  a plain AR step (T = 1 per row; pending drafts are dropped)
    DraftShape(d, J)      draft length d (2 <= d <= the block length k): verify up to d - 1
                          drafts and pre-draft blocks of d masks at the first m levels J <= d
                          (T = d (1 + m) per row)
    DraftShape(d, (), lookup=True)
                          verify up to d - 1 point-mass drafts per row, no pre-draft blocks
                          (T = d per row); lossless rows only
the one with the most expected committed tokens per second. Each row's drafts come from one
source, chosen per row and step: the model's pre-drafted block, a history draft (`history.py`:
the other completions of its prompt), a lookup draft (`lookup.py`: the tokens that followed the
latest earlier occurrence of the row's last few tokens), or none. History and lookup drafts are
point masses written over the row's pending drafts, so in a TiDAR step they cost what the
model's drafts of the same length cost and the step still pre-drafts the next block: the two
kinds stack in one forward. A row takes a point-mass draft where its expected tokens beat the
model's for the step's shape (`DraftPolicy.assign`). A shorter draft length gives up
the later, rarely accepted drafts for a much cheaper step: where every token costs compute
(a CPU, a GPU at large batch) d = 2 with one level carries 4 tokens per row instead of k (1 + k).
Blocks shorter than the trained k see fewer mask tokens, so their drafts differ slightly from
the full block's; the sampler is exact for any draft source, so this changes speed only.
- expected tokens per row-step: the stationary mean of a small Markov chain over "valid drafts
  at the start of a step", driven by acceptance-by-position estimates tracked online per
  request class (sampler, temperature bucket) and seeded from `tidar_config.json`
  (`"acceptance": {"<sampler>@<temperature>": [a_1, ..., a_{k-1}]}`) or a flat prior;
- point-mass drafts: expected tokens from the drafts each row has this step and acceptance by
  position tracked per class and source ("lossless@0+lookup", "lossless@0.5+history/aligned",
  "+history/long" and "+history/short" for suffix matches of >= 3 and < 3 tokens; seeded like
  the others); a verify-only step is chosen when it beats the best of the above this step and
  also pays against an AR step in a batch that must finish as a whole
  (`DraftPolicy._lookup_rate`), a TiDAR step with some rows on point-mass drafts when the sum
  over rows of the better source's tokens per second wins (`DraftPolicy._stacked_rate`);
- step time: with `cost_model="flat"` (a documented what-if, not a measurement) every step shape
  costs what an AR step over the same rows costs: the memory-bound regime of a GPU at small and
  medium batch, where a verify step of 8-16 tokens per row reads the same weights as an AR step.
  The policy then drafts whenever drafts are expected to be accepted; benchmarks use it to
  measure draft quality on a CPU, whose steps are compute-bound. Otherwise (`"calibrated"`,
  the default): `StepCostModel`, a least-squares fit of a + e * [TiDAR step] + b * rows +
  c * tokens + d * tokens * context over the steps this engine has timed, seeded by a short start-up calibration
  (`Engine.calibrate_step_costs`: timed steps of each kind on scratch prompts, cached per
  device, model shape and dtype) when the engine is configured for one.
The sampler is exact for any draft source, so nothing here can change the distribution of the
output; it changes which drafts are proposed, hence which tokens a given seed produces.
"""

from __future__ import annotations

import functools
import math
from collections import deque
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from ..params import SamplingParams

TEMPERATURE_BUCKETS = (0.0, 0.5, 0.9, 1.1)  # upper edges; above the last: one more bucket
PRIOR_ACCEPTANCE = 0.5  # per draft position, when nothing is known about a class
PRIOR_WEIGHT = 8.0      # how many observed attempts the prior (or calibration) is worth
DECAY = 0.995           # per observed step: older acceptance counts fade
EXPLORE_EVERY = 64      # measured AR time per second of measured exploring time (see DraftPolicy._best)
# What a lookup step saves must exceed its extra cost by this factor (`_lookup_rate`): the cost
# fit is least sure of the steps it rarely times, and row-steps saved late are cheaper than its
# per-row cost says (a shrinking batch; compiled steps pad rows to a power of two).
LOOKUP_MARGIN = 1.25
LOOKUP_LENGTH = 4       # the lookup step's draft length when only calibrated shapes run (compiled)
REFIT_EVERY = 16        # observed steps between re-rankings (acceptance estimates, cost fit)
# The same while AR steps win and no look-up is worth trying (see DraftPolicy._rank_every), at
# batch > 1 on a context bucket 4x coarser; a step that taught an acceptance estimate (an
# exploring step) re-ranks at once. A ranking costs ~1 ms: every 64 steps and 32 tokens it cost
# ~1.5-2% of an AR step at batch 8 on the CPU. Batch 1 keeps the finer cadence: there look-ups
# win (1.4-1.7x AR at T = 0) and the live cost fit and the context move their bound across AR's
# rate; the coarse cadence there gave 1.04x in one run.
AR_REFIT_EVERY = 256
RANK_CONTEXT = 32       # context bucket of a ranking (tokens)
# After a step whose rows looked up their point-mass drafts and the drafts did not pay, the
# next look-up waits 1, 2, 4, ... up to this many steps (reset when they pay): looking up costs
# host time on every row, and where it keeps losing it made AR-only rollouts up to 1.8x slower
# on the CPU at batch 64. Speed only: which steps run never changes the distribution.
LOOKUP_BACKOFF = 64
# Where AR steps win, look-ups whose steps take more than this many AR steps (moving averages
# of measured / predicted of each) are also paid from the exploring budget (`DraftPolicy._best`).
LOOKUP_GATE = 1.5
# Steps whose rows verify point-mass drafts are priced at the fit times how much longer than
# predicted such steps took, relative to AR steps, at the same batch and context bucket
# (`DraftPolicy._point_mass_scale`): calibration times them on scratch prompts at short context,
# whose look-ups find nothing and cost no host time, and with ~400-token rows at batch 64 on
# the CPU lookup steps ran 3.4x an AR step where the fit said they pay (2.1x our AR's time per
# token). Only ever raised, and only these steps: a per-kind measured / fitted correction of
# every kind made the kinds that never ran look cheap (T = 0, batch 1: 1.74x -> 1.34x AR).
PRICE_CONTEXT = 128     # context bucket of that correction (tokens)
COST_MODELS = ("calibrated", "flat")
POINT_MASS_KINDS = ("history/aligned", "history/long", "history/short", "lookup")


@dataclass(frozen=True)
class DraftShape:
    """A TiDAR decode step: draft length (drafts d_0..d_{length-1}, so up to length - 1 are
    verified) and the pre-draft levels, each a block of `length` mask tokens. `lookup`: a
    verify-only step (no levels) whose drafts come from each row's history (`lookup.py`)."""
    length: int
    levels: tuple[int, ...]
    lookup: bool = False

    @property
    def tokens_per_row(self) -> int:
        return self.length * (1 + len(self.levels))

    @property
    def block_length(self) -> int:
        """Length of each pre-draft block: the draft length, or 0 for a step with no levels."""
        return self.length if self.levels else 0


def request_class(params: SamplingParams, source: str = "") -> str:
    """The acceptance class of a row: sampler and temperature bucket ("lossless@0.9"), and
    "+<kind>" for point-mass drafts of that kind ("+lookup", "+history/aligned")."""
    return _class_name(params.sampler, params.temperature, source)


@functools.lru_cache(maxsize=4096)  # asked per row and step: formatting it each time cost ~1% of an AR step
def _class_name(sampler: str, temperature: float, source: str) -> str:
    edge = next((e for e in TEMPERATURE_BUCKETS if temperature <= e), math.inf)
    return f"{sampler}@{edge:g}" + (f"+{source}" if source else "")


def takes_lookup(params: SamplingParams) -> bool:
    """Whether a row may verify point-mass (lookup, history) drafts (lossless only: see
    `lookup.py`)."""
    return params.sampler == "lossless"


@dataclass(frozen=True)
class RowDraft:
    """Point-mass drafts a row may verify this step instead of the model's: the tokens and
    their kind ("lookup", "history/aligned", "history/long", "history/short"; the source is
    the part before the slash, `draft_source`)."""
    tokens: tuple[int, ...]
    kind: str


@dataclass
class AcceptanceEstimate:
    """Acceptance by draft position for one class: a_i = P(draft i accepted | drafts < i were).

    `attempts` and `accepts` hold the prior (PRIOR_WEIGHT attempts at `prior`'s rates, fading
    with DECAY like the observations) plus what was observed. A position is learned only where
    drafts reach it, and a policy that prices the unlearned positions at PRIOR_ACCEPTANCE never
    offers them where a token costs more than half a token gains: drafts accepted 0.98 at
    positions 1-3 kept 0.5 at 4-7, and 385 of 398 steps of a re-rollout whose history held every
    row's whole continuation were AR steps. So the prior of a position not seeded
    (`lifted[i]`) is optimistic, bounded: the estimate of the position before it where that is
    higher. The policy then offers the next positions as soon as the earlier ones earn it, and
    what is observed there replaces the prior as it fades; where drafts fail after position i,
    one step that offers them teaches it (the first failure counts at its position)."""
    attempts: list[float]
    accepts: list[float]
    prior: list[float] = field(default_factory=list)   # the prior's rate per position
    lifted: list[bool] = field(default_factory=list)   # positions whose prior may rise to the one before's
    weight: float = 0.0                                 # the prior's attempts now (PRIOR_WEIGHT, faded)

    @classmethod
    def prior_for(cls, k: int, rates: list[float] | None = None, lifted: bool = False) -> AcceptanceEstimate:
        """The prior of a class: `rates` (seeded, e.g. from `tidar_config.json`) where given, else
        PRIOR_ACCEPTANCE, lifted as above (`lifted`: the given rates too: borrowed, not the
        class's own seed)."""
        seeded = list(rates or [])[:k - 1]
        prior = seeded + [PRIOR_ACCEPTANCE] * (k - 1 - len(seeded))
        return cls([PRIOR_WEIGHT] * (k - 1), [PRIOR_WEIGHT * r for r in prior], prior,
                   [lifted] * len(seeded) + [True] * (k - 1 - len(seeded)), PRIOR_WEIGHT)

    # (rates, the same rounded to 0.01, gains) until the next observe / decay: a ranking reads
    # them ~100 times, and computed each time they were most of its ~1 ms.
    _memo: tuple | None = field(default=None, repr=False, compare=False)

    @property
    def rates(self) -> list[float]:
        return self._derived()[0]

    @property
    def rounded(self) -> tuple[float, ...]:
        """The rates rounded to 0.01 (what the expected-tokens chain is memoised on)."""
        return self._derived()[1]

    @property
    def gains(self) -> list[float]:
        """Expected accepted drafts by drafts offered (0..k-1): the chained acceptance."""
        return self._derived()[2]

    def _derived(self) -> tuple:
        if self._memo is None:
            rates: list[float] = []
            for i, (a, n) in enumerate(zip(self.accepts, self.attempts)):
                rate = a / n if n > 0 else 0.0
                if i and i < len(self.lifted) and self.lifted[i] and rates[-1] > self.prior[i] and n > 0:
                    rate += self.weight * (rates[-1] - self.prior[i]) / n  # the prior's part, lifted
                rates.append(rate)
            chain, gains = 1.0, [0.0]
            for r in rates:
                chain *= r
                gains.append(gains[-1] + chain)
            self._memo = (rates, tuple(round(r, 2) for r in rates), gains)
        return self._memo

    def observe(self, accepted: int, offered: int) -> None:
        for i in range(min(accepted + 1, offered)):
            self.attempts[i] += 1
        for i in range(accepted):
            self.accepts[i] += 1
        self._memo = None

    def decay(self) -> None:
        self.attempts = [x * DECAY for x in self.attempts]
        self.accepts = [x * DECAY for x in self.accepts]
        self.weight *= DECAY
        self._memo = None


def expected_tokens(rates: list[float], k: int, levels: tuple[int, ...] | None) -> float:
    """Mean tokens a row commits per step when every step uses `levels` (None: AR, 1 token).

    State: valid drafts v (0..k-1) at the start of a step. Accepting a of them (draft i passes
    with rates[i-1], given the earlier ones did) commits c = a + 1 tokens; the next step's
    drafts come from the largest level j <= c, so v' = k - 1 - (c - j), or 0 without levels."""
    if levels is None or k < 2:
        return 1.0
    P = np.zeros((k, k))
    mean_c = np.zeros(k)
    for v in range(k):
        survive = 1.0
        for a in range(v + 1):
            p_a = survive * (1 - rates[a]) if a < v else survive
            if a < v:
                survive *= rates[a]
            c = a + 1
            j = max((lv for lv in levels if lv <= c), default=None)
            nxt = 0 if j is None else k - 1 - (c - j)
            P[v, nxt] += p_a
            mean_c[v] += p_a * c
    dist = np.zeros(k)
    dist[k - 1] = 1.0
    dist = dist @ np.linalg.matrix_power(P, 64)
    return float(dist @ mean_c)


@functools.lru_cache(maxsize=1 << 16)
def _expected_tokens_memo(rates: tuple[float, ...], k: int, levels: tuple[int, ...]) -> float:
    return expected_tokens(list(rates), k, levels)


@dataclass
class StepCostModel:
    """Seconds of one decode step as a + e * drafting + b * rows + c * tokens + d * tokens * context,
    fitted by least squares on relative error to the calibration steps (`anchor`) and the 256
    most recent timed steps (drafting: 1 for a TiDAR step, whose verification and drafting cost
    more than an AR step's sampling; rows: sequences in the step; tokens = rows x tokens per
    row; context = mean committed length). The per-row term is what does not grow with a row's tokens (its logits, sampling,
    bookkeeping). Coefficients are kept non-negative; with fewer than five distinct
    observations, time is taken as proportional to tokens."""
    samples: deque = field(default_factory=lambda: deque(maxlen=256))
    # Calibration steps: kept for the engine's life, so a long run of live AR steps (which say
    # nothing about a TiDAR step's cost) cannot push the only TiDAR figures out of the fit.
    anchor: list = field(default_factory=list)
    _coef: tuple[float, ...] | None = None
    _dirty: bool = True
    _pending: int = 0  # samples since the last fit: refitted every REFIT_EVERY (or while unfitted)

    def observe(self, drafting: bool, rows: int, tokens: int, context: float, seconds: float) -> None:
        self.samples.append((int(drafting), rows, tokens, context, seconds))
        self._pending += 1
        self._dirty = self._dirty or self._coef is None or self._pending >= REFIT_EVERY

    def clear(self) -> None:
        self.samples.clear()
        self._dirty, self._coef, self._pending = True, None, 0

    def set_anchor(self, samples: list) -> None:
        """Makes these (calibration) samples permanent and clears the live ones."""
        self.anchor = [tuple(x) for x in samples]
        self.clear()

    @property
    def fitted(self) -> bool:
        """Whether a fit exists (the last one; it may be due for a refit)."""
        return self._coef is not None

    def coefficients(self) -> tuple[float, ...] | None:
        if self._dirty:
            self._dirty, self._pending = False, 0
            both = self.anchor + list(self.samples)
            data = np.array(both, dtype=np.float64)
            self._coef = None
            if len(data) and len({(g, r, t, round(c)) for g, r, t, c, _ in both}) >= 5:
                # Rows weighted by 1 / t: a 5 ms step and a 500 ms one count alike, so the
                # biggest steps do not decide the fit alone.
                X = np.stack([np.ones(len(data)), data[:, 0], data[:, 1], data[:, 2], data[:, 2] * data[:, 3]],
                             axis=1)
                w = 1.0 / np.maximum(data[:, 4], 1e-9)
                coef, *_ = np.linalg.lstsq(X * w[:, None], data[:, 4] * w, rcond=None)
                self._coef = tuple(float(max(x, 0.0)) for x in coef)
        return self._coef

    def predict(self, drafting: bool, rows: int, tokens: int, context: float, refit: bool = True) -> float:
        """`refit` False: with the last fitted coefficients (refitted only if there are none):
        the per-step bookkeeping of AR steps need not pay a least-squares fit every REFIT_EVERY
        steps; rankings refit."""
        coef = self.coefficients() if refit or self._coef is None else self._coef
        if coef is None or not any(coef):
            return float(tokens)  # only the ranking matters: cost proportional to work
        a, e, b, c, d = coef
        return a + e * drafting + b * rows + c * tokens + d * tokens * context


def _blend(average: float, ratio: float, weight: float) -> float:
    """A moving average of measured over predicted seconds (`ratio` counted with `weight`), kept
    within [0.1, 10]."""
    return min(max((1 - weight) * average + weight * ratio, 0.1), 10.0)


class DraftPolicy:
    """Chooses each decode step's level set (see the module docstring). mode "fixed" always
    uses every level the model has (the behaviour of a plain TiDAR engine, reproducible per
    seed); "auto" chooses by expected tokens per second."""

    def __init__(self, block_size: int, level_set: tuple[int, ...], mode: str = "fixed",
                 calibration: dict[str, list[float]] | None = None, lookup: bool = True,
                 cost_model: str = "calibrated", history: bool = False):
        if mode not in ("fixed", "auto"):
            raise ValueError(f"drafting must be 'fixed' or 'auto', got {mode!r}")
        if cost_model not in COST_MODELS:
            raise ValueError(f"cost_model must be one of {', '.join(COST_MODELS)}, got {cost_model!r}")
        self.cost_model = cost_model
        self.k, self.level_set, self.mode = block_size, tuple(level_set), mode
        self.full = DraftShape(block_size, self.level_set)  # what a plain TiDAR engine runs
        # Every draft length 2..k, each with every prefix of the levels that fit in it.
        self.candidates: list[DraftShape | None] = [None]
        for length in range(2, block_size + 1):
            fit = tuple(j for j in self.level_set if j <= length)
            self.candidates += [DraftShape(length, fit[:m]) for m in range(1, len(fit) + 1)]
        # Point-mass draft sources (auto drafting only), and verify-only steps over their
        # drafts, every draft length.
        self.lookup, self.history = lookup and mode == "auto", history and mode == "auto"
        self.lookup_candidates = ([DraftShape(length, (), lookup=True) for length in range(2, block_size + 1)]
                                  if self.lookup or self.history else [])
        self._explore_lookup = False  # whether the next exploring step is a lookup step (they alternate)
        self._lookup_wait, self._lookup_misses = 0, 0  # steps until the next look-up; look-ups lost in a row
        self.calibration = calibration or {}
        self.estimates: dict[str, AcceptanceEstimate] = {}
        self._priors: dict[str, AcceptanceEstimate] = {}  # the priors of classes not observed yet, as read
        self.costs = StepCostModel()
        # Exploring (see `_best`) spends measured time from a budget: each AR step the policy
        # chose earns 1/EXPLORE_EVERY of its measured seconds, each exploring step is charged
        # its measured seconds, and an exploration starts only when the budget holds its
        # expected cost. Predicted seconds set the budget before: the fit priced a '1/2' step
        # at batch 64 on the CPU at half its real cost (relative to an AR step), and
        # exploring took ~4% of an AR-only rollout instead of 1/EXPLORE_EVERY.
        self._explore_credit = 0.0
        # Measured over predicted seconds of exploring steps (a moving average): the expected
        # cost of the next exploration, so that the budget is rarely overdrawn.
        self._explore_scale = 1.0
        self._lookup_scale = 1.0  # the same for AR steps after a look-up that lost, over an AR step's prediction
        self._ar_scale = 1.0  # and for the AR steps the policy chose (a look-up's cost is counted against theirs)
        # (batch bucket, context bucket) -> moving average of measured / predicted seconds of
        # steps with point-mass drafts, and of AR steps without a look-up (`_point_mass_scale`).
        self._pm_ratio: dict[tuple[int, int], float] = {}
        self._ar_ratio: dict[tuple[int, int], float] = {}
        self._charging = False  # whether the step just chosen is charged to the budget
        self._earning = False   # whether it is an AR step the policy chose over drafting
        self._looked_up = False  # whether its rows looked up point-mass drafts (and they lost)
        # label ("ar", "1/2", ...; " exploring", " looked up" appended) -> [timed steps, seconds]:
        # where a rollout's time went (benchmarks read it).
        self.step_time: dict[str, list[float]] = {}
        # The step after an exploring TiDAR step: it verifies the drafts that step made (an
        # AR step would drop them: exploring taught nothing).
        self._follow_up: DraftShape | None = None
        self.last_choice: DraftShape | None = self.full
        self.choices: dict[str, int] = {}  # level-set label -> steps (reported in status)
        # draft source ("model", "history", "lookup", "none") -> [row-steps, drafts offered, accepted]
        self.sources: dict[str, list[int]] = {}
        self._observations = 0
        self._taught = 0  # observed steps that taught an acceptance estimate (see `_best`)
        self._mix: tuple | None = None  # the last step's rows' params and what `_row_mix` made of them
        # Observed steps per re-ranking: REFIT_EVERY, or AR_REFIT_EVERY while AR steps win and
        # no look-up is worth trying (AR steps teach no acceptance; a ranking costs ~1 ms).
        self._rank_every = REFIT_EVERY
        self._forced: tuple[DraftShape | None] | None = None  # (shape,) while calibrating
        self._decisions: dict[tuple, tuple] = {}

    def calibration_shapes(self) -> list[DraftShape | None]:
        """The step kinds start-up calibration times: AR; draft length 2 with one level; one
        level of the full block; every level; with lookup drafts, a verify-only lookup step of
        LOOKUP_LENGTH."""
        if self.k < 2:
            return [None]
        first = self.full.levels[:1]
        lookup = [DraftShape(min(LOOKUP_LENGTH, self.k), (), lookup=True)] if self.lookup_candidates else []
        return list(dict.fromkeys([None, DraftShape(2, first), DraftShape(self.k, first), self.full] + lookup))

    def restrict_to_calibrated(self) -> None:
        """Chooses among the calibrated shapes only (compiled steps: each shape is a compilation,
        paid once at start-up instead of whenever exploration first picks it)."""
        shapes = self.calibration_shapes()
        self.candidates = [s for s in shapes if s is None or not s.lookup]
        self.lookup_candidates = [s for s in shapes if s is not None and s.lookup]
        self._decisions.clear()

    @contextmanager
    def forcing(self, shape: DraftShape | None):
        """Every step takes `shape`, and steps teach only the cost model (calibration on
        scratch prompts, whose acceptance says nothing about real requests)."""
        self._forced = (shape,)
        try:
            yield
        finally:
            self._forced = None

    @staticmethod
    def tokens_per_row(shape: DraftShape | None) -> int:
        """In-step tokens of one row: 1 for an AR step, d drafts plus d per pre-draft level."""
        return 1 if shape is None else shape.tokens_per_row

    def estimate(self, cls: str) -> AcceptanceEstimate:
        if cls not in self.estimates:
            self.estimates[cls] = self._prior(cls)
        return self.estimates[cls]

    def _prior(self, cls: str) -> AcceptanceEstimate:
        """A class's estimate before it is observed: its seed (`tidar_config.json`), else for a
        point-mass kind, position by position, the higher of PRIOR_ACCEPTANCE and the rate of
        the row class's best point-mass kind that is seeded or observed. A row verifies the
        candidate its class expects most of (`best_draft`): at the 0.5 prior, history drafts lost
        every such comparison with the seeded lookup drafts (0.87-0.99) and were never verified,
        hence never learned, on greedy re-rollouts whose history held every row's continuation.
        Never below the 0.5 prior: borrowing the lookup seed of T = 1 (0.26-0.86) priced history
        drafts under the model's, so they were never offered and the RL run lost them (history
        19% of row-steps at acceptance 0.70 in its last 10 steps before, 0% after)."""
        seed = self.calibration.get(cls)
        base, _, kind = cls.partition("+")
        if seed is not None or not kind:
            return AcceptanceEstimate.prior_for(self.k, seed)
        known = [c for c in (f"{base}+{k}" for k in POINT_MASS_KINDS if k != kind)
                 if c in self.estimates or c in self.calibration]
        if not known:
            return AcceptanceEstimate.prior_for(self.k)
        best = max((self.estimates.get(c) or AcceptanceEstimate.prior_for(self.k, self.calibration[c]) for c in known),
                   key=lambda e: e.gains[-1])
        return AcceptanceEstimate.prior_for(self.k, [max(r, PRIOR_ACCEPTANCE) for r in best.rates], lifted=True)

    def _expected_tokens(self, cls: str, shape: DraftShape | None) -> float:
        """From the class's rates rounded to 0.01 (memoised: rates move slowly, and the chain
        is solved again only when they move)."""
        if shape is None:
            return 1.0
        return _expected_tokens_memo(self.estimate(cls).rounded[:shape.length - 1], shape.length, shape.levels)

    def expects_drafts(self) -> bool:
        """Whether a prefill should draft its rows' first step: always when fixed; with auto,
        when the last decode step pre-drafted (else the mask block would be computed for nothing)."""
        return self.mode == "fixed" or (self.last_choice is not None and not self.last_choice.lookup)

    def _row_mix(self, params: list[SamplingParams]) -> tuple[dict[str, int], int, bool]:
        """(drafting rows by class, how many rows draft, whether any row takes point-mass drafts),
        kept while a step's rows are those of the last step (the common case: the same requests
        decode step after step; the list compares its elements by identity first), so an AR
        step pays no per-row Python here."""
        if self._mix is None or self._mix[0] != params:
            counts: dict[str, int] = {}
            for p in params:
                if p.sampler != "ar":
                    cls = request_class(p)
                    counts[cls] = counts.get(cls, 0) + 1
            self._mix = (list(params), counts, sum(counts.values()), any(map(takes_lookup, params)))
        return self._mix[1:]

    def wants_lookup(self, params: list[SamplingParams]) -> bool:
        """Whether this step's rows should look up their point-mass drafts (`choose`'s `lookups`)."""
        not_forced_elsewhere = self._forced is None or (self._forced[0] is not None and self._forced[0].lookup)
        # The step after an exploring TiDAR step verifies the model's drafts: no look-up.
        return (bool(self.lookup_candidates) and not_forced_elsewhere and self._follow_up is None
                and self._row_mix(params)[2])

    def choose(self, params: list[SamplingParams], context: float,
               lookups: Callable[[], list[list[RowDraft]]] | None = None) -> DraftShape | None:
        """The shape of a decode step over rows with these params (None: AR step); `lookups`:
        gives each row's point-mass draft candidates this step (called only when they might
        win); which rows then take them: `assign`."""
        if self._forced is not None:
            return self._forced[0]
        self._charging = self._earning = self._looked_up = False
        counts, drafting, _ = self._row_mix(params)
        if not drafting or self.k < 2:
            choice, self._follow_up = None, None
        elif self.mode == "fixed":
            choice = self.full
        else:
            choice = self._best(params, counts, drafting, context, lookups)
        self.last_choice = choice
        label = level_label(choice, self.k)
        self.choices[label] = self.choices.get(label, 0) + 1
        return choice

    def _best(self, params: list[SamplingParams], counts: dict[str, int], num_drafting: int, context: float,
              lookups: Callable[[], list[list[int]]] | None):
        # The ranking changes only when the estimates or the cost fit do (every REFIT_EVERY
        # observations), or the batch's mix or context bucket does: decided once, then reused.
        # While AR steps win, AR steps teach no acceptance: re-ranked every AR_REFIT_EVERY
        # observations (batch 1: every REFIT_EVERY x 4), on a coarser context bucket (batch > 1),
        # and at once after a step that taught.
        ar = self._rank_every == AR_REFIT_EVERY
        coarse = ar and len(params) > 1
        key = (tuple(sorted(counts.items())), len(params), int(context) // (RANK_CONTEXT * (4 if coarse else 1)),
               self._rank_every, self._observations // self._rank_every, self._taught if ar else 0)
        decision = self._decisions.get(key)
        if decision is None:
            # Rows look up their drafts only when a step using them could win even if every
            # row that takes them had k - 1 of its best kind (the lookup costs host time on
            # every row).
            full = {(self._best_kind(cls), self.k - 1): n for cls, n in counts.items() if cls.startswith("lossless@")}
            ranked = self._rank(counts, len(params) - num_drafting, len(params), context)
            # The bound is only compared with the best rate: a stacked step's is needed only
            # where a lookup step's does not beat it (each costs ~1/3 of a ranking).
            bound = self._lookup_rate(len(params), full, context)[1]
            if bound <= ranked[-1]:
                bound = max(bound, self._stacked_rate(counts, full, len(params) - num_drafting, len(params),
                                                      context)[1])
            decision = ranked + (bound,)
            if len(self._decisions) > 4096:
                self._decisions.clear()
            self._decisions[key] = decision
        best, best_drafting, ar_seconds, _, best_rate, lookup_bound = decision
        self._rank_every = (REFIT_EVERY if best is not None or lookup_bound > best_rate
                            else AR_REFIT_EVERY if len(params) > 1 else 4 * REFIT_EVERY)
        if self._follow_up is not None:  # an exploring step made drafts: verify them
            follow_up, self._follow_up, self._charging = self._follow_up, None, True
            return follow_up
        looked_up = False
        if self._lookup_wait > 0:
            self._lookup_wait -= 1
        elif lookups is not None and lookup_bound > best_rate and (
                best is not None or self._lookup_misses == 0
                or self._lookup_scale < LOOKUP_GATE * self._ar_scale
                or self._explore_credit >= ar_seconds * (self._lookup_scale - self._ar_scale)):
            # Where AR steps win, a look-up after one that lost is paid from the exploring
            # budget: one that loses is charged what its step took beyond an AR step's
            # prediction (`observe_step`). At batch 64 on the CPU the history look-up made a
            # step ~4x an AR step, and the back-off alone let look-ups take ~6% of an AR-only
            # re-rollout. Look-ups that cost less (batch 1: ~1.1x an AR step) keep the back-off
            # alone: gating them too cut T = 0, batch 1 from 1.71x to 1.18x AR.
            looked_up = True
            offered = self._offered(params, lookups())
            lookup, rate = self._lookup_rate(len(params), offered, context)
            stacked, stacked_rate = self._stacked_rate(counts, offered, len(params) - num_drafting, len(params),
                                                       context)
            paid = True
            if stacked is not None and stacked_rate >= max(rate, best_rate):  # a tie: it pre-drafts too
                best = stacked
            elif lookup is not None and rate > best_rate:
                best = lookup
            else:
                paid = False
            self._lookup_misses = 0 if paid else self._lookup_misses + 1
            self._lookup_wait = 0 if paid else min(2 ** (self._lookup_misses - 1), LOOKUP_BACKOFF)
        if best is not None:
            self._explore_credit = min(self._explore_credit, 0.0)  # drafting steps teach: no exploring due
            return best
        # AR wins. Acceptance is only learned from drafting steps, so now and then explore
        # anyway, paid from the measured-time budget (`__init__`): exploring takes at most
        # ~1/EXPLORE_EVERY of the AR time, whatever the device and however wrong the cost fit.
        # The two draft sources take turns (each one's estimates only learn from its own steps):
        # a lookup step verifies point-mass drafts at once; the model's drafts take two steps,
        # one that pre-drafts and one that verifies them (`_exploration`).
        lookup_turn = self._explore_lookup and lookups is not None
        if best_drafting is not None and self._explore_credit >= self._exploring_cost(best_drafting, lookup_turn,
                                                                                     len(params), context):
            self._explore_lookup = not self._explore_lookup
            self._charging = True
            if lookup_turn:
                lookup, _ = self._lookup_rate(len(params), self._offered(params, lookups()), context, explore=True)
                if lookup is not None:
                    return lookup
            self._follow_up = self._verifying(best_drafting)
            return best_drafting
        # A look-up that lost is charged to the budget like an exploring step.
        self._earning, self._looked_up, self._charging = not looked_up, looked_up, looked_up
        return None

    def _verifying(self, shape: DraftShape) -> DraftShape:
        """The step that verifies the drafts an exploring step of this shape made: verify-only
        where that is a candidate (d tokens per row instead of d (1 + m)), else the same shape."""
        verify = DraftShape(shape.length, (), lookup=True)
        return verify if verify in self.lookup_candidates else shape

    def _exploring_cost(self, best_drafting: DraftShape, lookup_turn: bool, rows: int, context: float) -> float:
        """The expected measured seconds of the next exploration: a lookup step (priced at the
        longest, before any look-up: looking up costs host time on every row), or the best
        drafting step and the step that verifies its drafts; predicted, times how much longer
        than predicted exploring steps have really taken."""
        shapes = [self.lookup_candidates[-1]] if lookup_turn else [best_drafting, self._verifying(best_drafting)]
        return self._explore_scale * sum(self.costs.predict(True, rows, rows * s.tokens_per_row, context)
                                         for s in shapes)

    def _gains(self, cls: str) -> list[float]:
        """Expected accepted drafts of a class by drafts offered (0..k-1): the chained acceptance."""
        est = self.estimates.get(cls)
        if est is None:  # read without adding the class: only observed steps create estimates
            est = self._priors.get(cls)
            if est is None:
                est = self._priors[cls] = self._prior(cls)
        return est.gains

    def _best_kind(self, cls: str) -> str:
        """The point-mass class of a row class with the most expected tokens at k - 1 drafts."""
        kinds = (["history/aligned", "history/long", "history/short"] if self.history else []) + (
            ["lookup"] if self.lookup else [])
        return max((f"{cls}+{kind}" for kind in kinds), key=lambda c: self._gains(c)[-1], default=f"{cls}+lookup")

    def best_draft(self, params: SamplingParams, candidates: list[RowDraft]) -> RowDraft | None:
        """Of a row's point-mass candidates, the one with the most expected accepted drafts."""
        if not candidates or not takes_lookup(params):
            return None
        cls = request_class(params)
        return max(candidates, key=lambda d: self._gains(f"{cls}+{d.kind}")[min(len(d.tokens), self.k - 1)])

    def _offered(self, params: list[SamplingParams], lookups: list[list[RowDraft]]) -> dict[tuple[str, int], int]:
        """Rows by (point-mass class, drafts they have this step), for the rows that take them."""
        offered: dict[tuple[str, int], int] = {}
        for p, candidates in zip(params, lookups):
            draft = self.best_draft(p, candidates)
            if draft is not None:
                key = (request_class(p, draft.kind), min(len(draft.tokens), self.k - 1))
                offered[key] = offered.get(key, 0) + 1
        return offered

    def _stacked_rate(self, counts: dict[str, int], offered: dict[tuple[str, int], int], ar_rows: int, rows: int,
                      context: float) -> tuple[DraftShape | None, float]:
        """The best TiDAR step in which each row with point-mass drafts verifies them instead of
        the model's where that is expected to commit more (`assign`), and its expected tokens
        per second; `counts`: drafting rows by class, `offered` as in `_lookup_rate`. Like a
        verify-only step it must pay against an AR step by its point-mass drafts alone
        (`_point_mass_gain`): the model's drafts count in its rate, but rows coming from AR
        steps have none to verify yet, and the rate alone chose steps that ran 0.4x AR at
        batch 64 on the CPU."""
        if not offered or not self.lookup_candidates:
            return None, -1.0
        plain = dict(counts)  # drafting rows without point-mass drafts, by class
        for (cls, _), n in offered.items():
            base = cls.split("+")[0]
            plain[base] = plain.get(base, 0) - n
        best, best_rate, scale = None, -1.0, self._point_mass_scale(rows, context)
        prices = self._seconds(False, 0, 0, context), self._seconds(False, rows, rows, context)
        for shape in self.candidates[1:]:
            tokens = ar_rows + sum(n * self._expected_tokens(cls, shape) for cls, n in plain.items())
            for (cls, length), n in offered.items():
                gain = self._gains(cls)[min(length, shape.length - 1)]
                tokens += n * max(1.0 + gain, self._expected_tokens(cls.split("+")[0], shape))
            seconds = max(self._seconds(True, rows, rows * shape.tokens_per_row, context) * scale, 1e-12)
            if not self._point_mass_gain(shape, rows, offered, seconds, prices)[1]:
                continue
            rate = tokens / seconds
            if rate > best_rate:
                best, best_rate = shape, rate
        return best, best_rate

    def assign(self, params: list[SamplingParams], shape: DraftShape | None,
               lookups: list[list[RowDraft]]) -> list[RowDraft | None]:
        """Per row, the point-mass drafts it verifies in a step of this shape (None: the model's
        own drafts, or none): in a verify-only step every row's best candidate; in a TiDAR step
        those whose expected tokens beat the model's drafts at this shape."""
        out: list[RowDraft | None] = []
        for p, candidates in zip(params, lookups):
            draft = self.best_draft(p, candidates) if shape is not None else None
            if draft is not None and not shape.lookup:
                cls = request_class(p)
                gain = self._gains(f"{cls}+{draft.kind}")[min(len(draft.tokens), shape.length - 1)]
                if 1.0 + gain <= self._expected_tokens(cls, shape):
                    draft = None
            out.append(None if draft is None else RowDraft(draft.tokens[:shape.length - 1], draft.kind))
        return out

    def _lookup_rate(self, rows: int, offered: dict[tuple[str, int], int], context: float,
                     explore: bool = False) -> tuple[DraftShape | None, float]:
        """The best lookup step over `rows` rows and its expected tokens per second (None, -1
        when none pays; `explore`: the best by rate, paying or not); `offered`: rows by (lookup
        class, drafts they have). A row commits 1 + g, g the chained acceptance of the drafts
        the step verifies (g = 0 without drafts).

        A lookup step must also pay against an AR step in a batch that has to finish as a whole
        (an RL rollout batch): it advances only the rows that have drafts, and the batch ends
        with its slowest row. Against an AR step of fixed cost a plus r per row, its extra cost
        must be below what it saves later: r per extra token (row-steps no longer needed) plus
        a per step the whole batch is shortened by, i.e. min g over the rows (0 unless every
        row has drafts), by LOOKUP_MARGIN. At batch 1 this is the rate comparison; at batch 64
        on a CPU, where a lookup step costs 2.4x an AR step, the rate alone chose lookup steps
        that ran 0.8x."""
        if not offered or not self.lookup_candidates:
            return None, -1.0
        best, best_rate, scale = None, -1.0, self._point_mass_scale(rows, context)
        prices = self._seconds(False, 0, 0, context), self._seconds(False, rows, rows, context)
        for shape in self.lookup_candidates:
            seconds = max(self._seconds(True, rows, rows * shape.length, context) * scale, 1e-12)
            extra, pays = self._point_mass_gain(shape, rows, offered, seconds, prices)
            if not explore and not pays:
                continue
            if (rows + extra) / seconds > best_rate:
                best, best_rate = shape, (rows + extra) / seconds
        return best, best_rate

    def _point_mass_gain(self, shape: DraftShape, rows: int, offered: dict[tuple[str, int], int], seconds: float,
                         prices: tuple[float, float]) -> tuple[float, bool]:
        """The extra tokens the rows' point-mass drafts are expected to commit in a step of this
        shape (`offered` as in `_lookup_rate`), and whether that pays for the step against an AR
        step in a batch that must finish as a whole (the rule in `_lookup_rate`); `prices`: the
        predicted seconds of a step's fixed part and of an AR step over the rows."""
        g = {key: self._gains(key[0])[min(key[1], shape.length - 1)] for key in offered}
        extra = sum(n * g[key] for key, n in offered.items())
        shortened = min(g.values()) if sum(offered.values()) == rows else 0.0
        fixed, ar = prices
        return extra, (ar - fixed) / rows * extra + fixed * shortened > LOOKUP_MARGIN * (seconds - ar)

    def _point_mass_scale(self, rows: int, context: float) -> float:
        """How much longer than the fit's price a step with point-mass drafts takes, relative to
        an AR step, at this batch and context (>= 1; 1 under the flat cost model or before any
        such step was timed). A context bucket where none ran takes the nearest shorter one's:
        a step's host look-up and attention only grow with the context."""
        if self.cost_model == "flat" or not self._pm_ratio:
            return 1.0
        batch, bucket = rows.bit_length(), int(context) // PRICE_CONTEXT
        pm = next((self._pm_ratio[(batch, b)] for b in range(bucket, -1, -1) if (batch, b) in self._pm_ratio), None)
        if pm is None:
            return 1.0
        known = [b for r, b in self._ar_ratio if r == batch]
        if not known:
            return max(pm, 1.0)
        near = min(known, key=lambda b: (abs(b - bucket), b > bucket))  # the same bucket, else the nearest
        return max(pm / self._ar_ratio[(batch, near)], 1.0)

    def _observe_price(self, point_mass: bool, rows: int, tokens: int, context: float, seconds: float) -> None:
        """Feeds `_point_mass_scale`: measured / predicted seconds of a timed step with point-mass
        drafts, or of an AR step whose rows looked nothing up."""
        predicted = self.costs.predict(point_mass, rows, tokens, context, refit=False)
        if predicted <= 0 or not self.costs.fitted:
            return
        table, weight = (self._pm_ratio, 0.5) if point_mass else (self._ar_ratio, 0.1)
        key = (rows.bit_length(), int(context) // PRICE_CONTEXT)
        table[key] = _blend(table.get(key, 1.0), seconds / predicted, weight)

    def _seconds(self, drafting: bool, rows: int, tokens: int, context: float) -> float:
        """A step's predicted seconds; under the flat cost model, an AR step's over the same rows
        whatever its shape."""
        if self.cost_model == "flat":
            return self.costs.predict(False, rows, rows, context)
        return self.costs.predict(drafting, rows, tokens, context)

    def _rank(self, counts: dict[str, int], ar_rows: int, rows: int, context: float):
        """(best shape, best drafting shape, predicted seconds of an AR step, of that drafting
        step, the best shape's expected tokens per second)."""
        best, best_rate, best_drafting, best_drafting_rate, seconds = None, -1.0, None, -1.0, {}
        for shape in self.candidates:
            tokens = ar_rows + sum(n * self._expected_tokens(cls, shape) for cls, n in counts.items())
            seconds[shape] = max(self._seconds(shape is not None, rows, rows * self.tokens_per_row(shape), context),
                                 1e-12)
            rate = tokens / seconds[shape]
            if rate > best_rate:
                best, best_rate = shape, rate
            if shape is not None and rate > best_drafting_rate:
                best_drafting, best_drafting_rate = shape, rate
        return best, best_drafting, seconds[None], seconds[best_drafting], best_rate

    def observe_step(self, params: list[SamplingParams], shape: DraftShape | None, accepted: list[int],
                     offered: list[int], context: float, seconds: float | None,
                     kinds: list[str] | None = None) -> None:
        """After a decode step of this shape (None: it ran as an AR step): its time (None: the
        step paid a one-off cost and is not timed), and each drafting row's acceptance, learned
        under the kind of point-mass drafts it verified (`kinds`: per row, "" for the model's
        own drafts; None: no row had point-mass drafts)."""
        tokens = len(params) * self.tokens_per_row(shape)
        if self._forced is None and seconds is not None:
            verified = DraftShape(shape.length, ()) if shape is not None and shape.lookup and not kinds else shape
            label = level_label(verified, self.k) + (" looked up" if self._looked_up else "") + (
                " exploring" if self._charging and not self._looked_up else "")
            spent = self.step_time.setdefault(label, [0, 0.0])
            spent[0], spent[1] = spent[0] + 1, spent[1] + seconds
        if self._forced is None and (self._charging or self._earning):
            # The last fit: refitting here cost an AR step ~0.5% at batch 8 (rankings refit).
            predicted = self.costs.predict(shape is not None, len(params), tokens, context, refit=False)
            spent = predicted if seconds is None else seconds
            timed = seconds is not None and predicted > 0 and self.costs.fitted
            if self._earning:
                self._explore_credit += spent / EXPLORE_EVERY
                if timed:
                    self._ar_scale = _blend(self._ar_scale, seconds / predicted, 0.1)
            elif self._looked_up:
                self._explore_credit -= max(spent - predicted * self._ar_scale, 0.0)
                if timed:
                    self._lookup_scale = _blend(self._lookup_scale, seconds / predicted, 0.5)
            else:
                self._explore_credit -= spent
                if timed:
                    self._explore_scale = _blend(self._explore_scale, seconds / predicted, 0.5)
            self._charging = self._earning = False
        if seconds is not None and self._forced is None and self.cost_model == "calibrated":
            point_mass = shape is not None and bool(kinds) and any(kinds)
            if point_mass or (shape is None and not self._looked_up):
                self._observe_price(point_mass, len(params), tokens, context, seconds)
        if seconds is not None:
            self.costs.observe(shape is not None, len(params), tokens, context, seconds)
        if self._forced is not None:
            return
        if any(offered):
            self._taught += 1
            if self._taught % REFIT_EVERY == 0:
                self._priors.clear()  # an unobserved kind's prior follows the estimates it borrows from
        seen = set()
        for i, (p, a, n) in enumerate(zip(params, accepted, offered)):
            kind = kinds[i] if kinds else ""
            count_source(self.sources, draft_source(kind, n), n, a)
            if n > 0:
                est = self.estimate(request_class(p, kind))
                if id(est) not in seen:
                    est.decay()
                    seen.add(id(est))
                est.observe(a, n)
        self._observations += 1

    def status(self) -> dict:
        coef = self.costs.coefficients()
        return dict(drafting=self.mode, cost_model=self.cost_model, level_set=level_label(self.last_choice, self.k),
                    level_choices=dict(self.choices),
                    acceptance={c: [round(r, 3) for r in e.rates] for c, e in self.estimates.items()},
                    draft_sources=source_summary(self.sources),
                    step_cost=list(coef) if coef else [])


def draft_source(kind: str, offered: int) -> str:
    """The source of a row's verified drafts: its point-mass kind's ("history", "lookup"), else
    "model" (its pre-drafted block) when it verified any, else "none"."""
    return kind.split("/")[0] if kind else ("model" if offered > 0 else "none")


def count_source(table: dict[str, list[int]], source: str, offered: int, accepted: int) -> None:
    """One row-step of a source: [row-steps, drafts offered, drafts accepted] += [1, offered, accepted]."""
    row = table.setdefault(source, [0, 0, 0])
    row[0], row[1], row[2] = row[0] + 1, row[1] + offered, row[2] + accepted


def source_summary(sources: dict[str, list[int]]) -> dict[str, dict[str, float]]:
    """Per draft source ("model", "history", "lookup", "none"): its share of decode row-steps,
    the share of its offered drafts accepted, tokens it committed per row-step, and the raw
    counts (row_steps, offered, accepted: summaries of several engines add up from them)."""
    total = sum(s for s, _, _ in sources.values()) or 1
    return {name: dict(share=round(steps / total, 4), acceptance=round(acc / offered, 4) if offered else 0.0,
                       tokens_per_step=round((steps + acc) / steps, 4) if steps else 0.0,
                       row_steps=steps, offered=offered, accepted=acc)
            for name, (steps, offered, acc) in sorted(sources.items())}


def level_label(shape: DraftShape | None, block_size: int) -> str:
    """"ar" for an AR step; "lookup/d" for a lookup step of draft length d; else the number of
    pre-draft levels, then "/d" when the draft length d is shorter than the block ("1/2": one
    level, draft length 2)."""
    if shape is None:
        return "ar"
    if shape.lookup:
        return f"lookup/{shape.length}"
    m = str(len(shape.levels))
    return m if shape.length == block_size else f"{m}/{shape.length}"
