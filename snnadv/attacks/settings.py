"""Settings of the adaptive evaluation suite (:mod:`snnadv.attacks.suite`): eps lists,
the suite's sizes, the gradient paths of a target, the adaptive PGD step size."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..errors import SnnadvError
from ..evaluation import is_snn
from ..gradients import DEFAULT_PATH
from ..values import parse_list
from ..registry import GRADIENTS
from ..surrogates import make_surrogate
from .base import check_eps, parse_eps

SUITES = ("paper", "adaptive", "full")
DEFAULT_SWEEP = "0,2/255,4/255,8/255,16/255,32/255,64/255"


def parse_eps_list(value) -> list[float]:
    """'2/255,8/255', a list of such, or one number -> a list of eps in [0, 1]."""
    out = [parse_eps(v) for v in parse_list(value)]
    if not out:
        raise SnnadvError("eps needs at least one value (e.g. 8/255 or 2/255,8/255)")
    for e in out:
        check_eps(e)
    return out


def eps_label(eps: float) -> str:
    """8/255 for multiples of 1/255, else the number."""
    k = eps * 255
    return f"{round(k)}/255" if abs(k - round(k)) < 1e-6 else f"{eps:.4g}"


@dataclass
class EvalSettings:
    """Everything an evaluation depends on (sizes are small-able for tests)."""

    suite: str = "full"
    eps: list = field(default_factory=lambda: [8 / 255])
    eot: int = 4
    eval_draws: int = 4
    paths: object = "all"
    steps: int = 20
    restarts: int = 2
    alpha: float | None = None
    apgd_steps: int = 20
    square_queries: int = 1000
    sweep_eps: list = field(default_factory=lambda: parse_eps_list(DEFAULT_SWEEP))
    sweep_steps: int = 20
    slope: float = 5.0
    library: bool = True
    flag_tol: float | None = None
    zero_tol: float = 5.0
    stat_images: int = 64
    batch_size: int = 64
    seed: int = 0

    def check(self) -> "EvalSettings":
        if self.suite not in SUITES:
            raise SnnadvError(f"unknown suite '{self.suite}' (choose {', '.join(SUITES)})")
        self.eps = parse_eps_list(self.eps)
        self.sweep_eps = parse_eps_list(self.sweep_eps)
        for key, name in (("eot", "--eot"), ("eval_draws", "--eval-draws"), ("steps", "--steps"),
                          ("restarts", "--restarts"), ("apgd_steps", "--apgd-steps"),
                          ("square_queries", "--square-queries"), ("sweep_steps", "--sweep-steps"),
                          ("stat_images", "--stat-images"), ("batch_size", "--batch-size")):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise SnnadvError(f"{name} must be an integer of at least 1, got {v}")
        if self.alpha is not None:
            self.alpha = parse_eps(self.alpha)
            if self.alpha <= 0:
                raise SnnadvError(f"alpha must be positive, got {self.alpha:g}")
        for key in ("slope", "zero_tol", "flag_tol"):
            v = getattr(self, key)
            if v is None and key == "flag_tol":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (key == "slope" and v == 0):
                kind = "positive" if key == "slope" else "non-negative"
                raise SnnadvError(f"{key.replace('_', '-')} must be a {kind} number, got {v}")
            setattr(self, key, float(v))
        return self

    @classmethod
    def from_config(cls, cfg: dict) -> "EvalSettings":
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: cfg[k] for k in names if k in cfg and cfg[k] is not None}).check()

    def to_dict(self) -> dict:
        return asdict(self)


def proxy_path(path: str) -> bool:
    """Whether the gradient path differentiates a proxy model (``ann``), not the target."""
    return bool(getattr(GRADIENTS.get(path), "needs_proxy", False))


def all_paths(model, slope: float | None = None) -> list[str]:
    """What ``all`` means for an SNN: every registered path but the duplicates of another
    (``bptt``: alg1's direction), ``bptt-<s>`` when s (with ``slope``) is exactly the
    model's training surrogate (then also alg1's direction), and the paths marked
    ``opt_in`` (``hart``, ``pdsg``: run by name, see :mod:`snnadv.gradients`)."""
    own = model.surrogate
    same = f"bptt-{own.name}" if make_surrogate(own.name, slope=slope).params() == own.params() else None
    return [q for q in GRADIENTS if q != same and not getattr(GRADIENTS[q], "duplicate_of", None)
            and not getattr(GRADIENTS[q], "opt_in", False)]


def resolve_paths(model, paths, slope: float | None = None) -> list[str]:
    """The gradient paths to attack ``model`` with (``all``, ``paper`` or a list; see :func:`all_paths`)."""
    items = parse_list(paths if isinstance(paths, (list, tuple)) else str(paths))
    if not items:
        raise SnnadvError("--paths needs at least one gradient path (or 'all')")
    if not is_snn(model):
        for p in items:
            if p not in ("all", "paper", "autograd"):
                if p in GRADIENTS:
                    raise SnnadvError(f"gradient path '{p}' applies to SNN targets only; an ANN target uses autograd")
                raise SnnadvError(f"unknown gradient path '{p}' (an ANN target has one: autograd)")
        return ["autograd"]
    out: list[str] = []
    for p in items:
        expanded = all_paths(model, slope) if p == "all" else [DEFAULT_PATH] if p == "paper" else [p]
        for q in expanded:
            if q not in GRADIENTS:
                raise SnnadvError(f"unknown gradient path '{q}' (choose all, {', '.join(GRADIENTS)})")
            if q not in out:
                out.append(q)
    return out


def paper_path(model) -> str:
    return DEFAULT_PATH if is_snn(model) else "autograd"


def stochastic_path(model, path: str) -> bool:
    """Whether the path's gradient depends on the encoder draw."""
    return is_snn(model) and not proxy_path(path)


def adaptive_alpha(eps: float, steps: int, alpha: float | None = None) -> float:
    """PGD step size: ``alpha`` if given, else max(2.5 eps / steps, eps / 8)."""
    return float(alpha) if alpha is not None else max(2.5 * eps / steps, eps / 8)
