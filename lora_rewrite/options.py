"""The options of the runlora backend: `torch.compile(model, backend="runlora", options={...})`.

Keys (all optional):

    criterion        "flops" (default) | "roofline" | "time" — how each site's variants are chosen
    forward          force a forward variant by its paper name, e.g. "forward2"
    backward         force a backward variant by its paper name, e.g. "backward5"
    dynamic_policy   "hint" (default) | "guard" — how a symbolic token count N is decided on
    forms            "measured" (default) | "direct" | {role: form} — the physical form of each product
                     (lora_rewrite/forms.py): measured once per machine and shape and kept on disk
                     (lora_rewrite/tuning.py), every product as its equation writes it, or forced
    fuse_siblings    True (default) | False — do the X·Aᵀ and dA products of sibling adapters that
                     read the same input (q/k/v, gate/up) as one product each (passes/fuse.py)
    codegen          True (default) | False — False runs the rewritten graphs op by op, without
                     Inductor code generation (Inductor's decompositions, joint passes and
                     partitioner still run): fast to compile, for tests and debugging
    rewrite          True (default) | False — False compiles exactly like stock Inductor
    debug            False (default) | True — log the per-graph report (env: RUNLORA_DEBUG=1)
    strict           False (default) | True — re-raise an exception inside runlora instead of leaving
                     the site (or graph) as stock Inductor compiles it (env: RUNLORA_STRICT=1;
                     lora_rewrite/containment.py)
    dump_dir         a folder for graphs, reports and pictures (env: RUNLORA_DUMP_DIR)
    disable          a list of the pass's behaviours to turn off (`BEHAVIOURS`), each for a same-process
                     A/B measurement of what it buys (lora_rewrite/bench/ab.py); default: none
    inductor         a dict of Inductor config patches, as stock torch.compile's `options` takes

Any other key that names an Inductor config entry is passed to Inductor as stock torch.compile
would; anything else is a ValueError that lists the valid keys.

Where `options` cannot be passed (Hugging Face Trainer), environment variables set them (`ENVIRONMENT`):
RUNLORA_REWRITE=0 (compile exactly like stock Inductor), RUNLORA_CRITERION, RUNLORA_FORMS ("measured" |
"direct"), RUNLORA_DUMP_DIR, RUNLORA_DEBUG, RUNLORA_STRICT. An option passed explicitly wins; a bad value
is a ValueError naming the valid ones.

A forced variant that is illegal at a site (forward2 under dropout, say) is not applied there: the
site falls back to the criterion's choice and the report says so. Correctness first.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from lora_rewrite.cost import CRITERIA
from lora_rewrite.variants import BACKWARDS, FORWARDS, variant_names

DYNAMIC_POLICIES = ("hint", "guard")
FORMS_MEASURED = "measured"
FORMS_DIRECT = "direct"
FORMS_CHOICES = (FORMS_MEASURED, FORMS_DIRECT)
ENV_DEBUG = "RUNLORA_DEBUG"
ENV_DUMP_DIR = "RUNLORA_DUMP_DIR"
ENV_STRICT = "RUNLORA_STRICT"
# The options a user who cannot pass `options` (Hugging Face Trainer: `torch_compile_backend="runlora"` only)
# reaches through the environment. An option passed explicitly wins over its variable.
ENV_REWRITE = "RUNLORA_REWRITE"
ENV_CRITERION = "RUNLORA_CRITERION"
ENV_FORMS = "RUNLORA_FORMS"
ENVIRONMENT = {"rewrite": ENV_REWRITE, "criterion": ENV_CRITERION, "forms": ENV_FORMS, "debug": ENV_DEBUG,
               "strict": ENV_STRICT, "dump_dir": ENV_DUMP_DIR}
TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")

# The behaviours of the pass that option `disable` turns off, each with what it does. Every one is on by
# default; turning one off keeps every rewrite correct (each is a choice between equal values), it only
# undoes what the behaviour buys, so that a same-process A/B can measure it (lora_rewrite/bench/ab.py).
BEHAVIOURS: dict[str, str] = {
    "merge_casts": "merge each cast the rewrite repeats with the same cast already in the graph "
                   "(passes/fx.py merge_duplicate_casts)",
    "recompute_upcasts": "tag the widening casts of X and of the parameters for recomputation in the backward, "
                         "so that the narrower source is kept (passes/rewrite.py upcasts_worth_recomputing)",
    "dx_through_casts": "under torch.autocast, take over a DoRA site's whole input gradient where the base's "
                        "16-bit sum is found through casts (passes/match_dora.py; off: only the adapter's dX_a)",
    "add_narrow_base": "forward1 adds a base in a narrower dtype as it is, in the wider dtype (off: the base is "
                       "widened first and the adapter accumulated onto it with addmm, the form before 2026-12-06)",
}


def _truthy_env(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _env_switch(name: str) -> bool | None:
    """An on/off variable: None where it is unset, else True or False; any other value a ValueError."""
    value = os.environ.get(name, "").strip().lower()
    if value == "":
        return None
    if value not in TRUE_WORDS + FALSE_WORDS:
        raise ValueError(f"environment variable {name}={os.environ[name]!r}: must be one of "
                         f"{list(TRUE_WORDS + FALSE_WORDS)!r}")
    return value in TRUE_WORDS


def _env_choice(name: str, valid) -> str | None:
    value = os.environ.get(name, "").strip()
    if value == "":
        return None
    if value not in valid:
        raise ValueError(f"environment variable {name}={value!r}: must be one of {list(valid)!r}")
    return value


@dataclass(frozen=True)
class RunLoraOptions:
    """The backend's validated options (`from_user` builds them from the user's dict).

    Attributes:
        criterion: how each site's variants are chosen: "flops", "roofline" or "time" (lora_rewrite.cost).
        forward: a forward variant's paper name to force where it is legal, or None.
        backward: a backward variant's paper name to force where it is legal, or None.
        dynamic_policy: for a symbolic token count N, "hint" (decide at the size hint, no guard) or "guard"
            (guard the interval of N where the choice holds; flops only). See passes/plan.py.
        forms: "measured" (time each product's forms once per machine and shape), "direct" (every
            product as its equation writes it) or a dict {role: form} forcing some (lora_rewrite/forms.py).
        fuse_siblings: do the X·Aᵀ and dA products of adapters that read one input as one product each.
        codegen: False runs the rewritten graphs op by op instead of generating Inductor code.
        rewrite: False compiles exactly like stock Inductor.
        debug: log each graph's report (env RUNLORA_DEBUG).
        strict: re-raise exceptions inside runlora instead of containing them (env RUNLORA_STRICT).
        dump_dir: a folder for graphs, reports and pictures, or None (env RUNLORA_DUMP_DIR).
        disable: the names of the behaviours (`BEHAVIOURS`) turned off, as a sorted tuple.
        inductor: Inductor config patches.
    """

    criterion: str = "flops"
    forward: str | None = None
    backward: str | None = None
    dynamic_policy: str = "hint"
    forms: Any = FORMS_MEASURED
    fuse_siblings: bool = True
    codegen: bool = True
    rewrite: bool = True
    debug: bool = False
    strict: bool = False
    dump_dir: str | None = None
    disable: Any = ()
    inductor: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        _check_choice("criterion", self.criterion, CRITERIA)
        _check_choice("dynamic_policy", self.dynamic_policy, DYNAMIC_POLICIES)
        if isinstance(self.forms, Mapping):
            from lora_rewrite.forms import check_forms

            check_forms(self.forms)
            object.__setattr__(self, "forms", dict(self.forms))
        else:
            if not isinstance(self.forms, str) or self.forms not in FORMS_CHOICES:
                raise ValueError(f"runlora option 'forms' must be one of {list(FORMS_CHOICES)!r} or a dict "
                                 f"{{role: form}}, got {self.forms!r}")
        if self.forward is not None:
            _check_choice("forward", self.forward, variant_names(FORWARDS))
        if self.backward is not None:
            _check_choice("backward", self.backward, variant_names(BACKWARDS))
        for key in ("fuse_siblings", "codegen", "rewrite", "debug", "strict"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"runlora option {key!r} must be True or False, got {getattr(self, key)!r}")
        if self.dump_dir is not None and not isinstance(self.dump_dir, (str, os.PathLike)):
            raise ValueError(f"runlora option 'dump_dir' must be a path, got {self.dump_dir!r}")
        if not isinstance(self.inductor, Mapping):
            raise ValueError(f"runlora option 'inductor' must be a dict of Inductor config entries, "
                             f"got {self.inductor!r}")
        disable = [self.disable] if isinstance(self.disable, str) else self.disable
        if not isinstance(disable, (list, tuple, set, frozenset)) or \
                any(not isinstance(name, str) or name not in BEHAVIOURS for name in disable):
            raise ValueError(f"runlora option 'disable' must be a list of behaviour names from "
                             f"{sorted(BEHAVIOURS)!r}, got {self.disable!r}")
        object.__setattr__(self, "disable", tuple(sorted(set(disable))))

    def enabled(self, behaviour: str) -> bool:
        """Is this behaviour of the pass on (not named in `disable`)?"""
        if behaviour not in BEHAVIOURS:
            raise KeyError(f"no runlora behaviour {behaviour!r}; the behaviours are {sorted(BEHAVIOURS)!r}")
        return behaviour not in self.disable

    def forced_forms(self) -> dict | None:
        """The forms to use everywhere ("direct": none named, every default), or None: measure."""
        if self.forms == FORMS_MEASURED:
            return None
        return {} if self.forms == FORMS_DIRECT else dict(self.forms)

    def rewrite_key(self) -> str:
        """Everything that changes the rewritten graph: part of the compile-cache key."""
        forms = sorted(self.forms.items()) if isinstance(self.forms, Mapping) else self.forms
        return repr((self.rewrite, self.criterion, self.forward, self.backward, self.dynamic_policy, forms,
                     self.fuse_siblings, self.debug, self.strict, str(self.dump_dir) if self.dump_dir else None,
                     self.disable))

    @classmethod
    def from_user(cls, options: Mapping[str, Any] | None) -> "RunLoraOptions":
        """Validate a user's `options` dict; environment variables (`ENVIRONMENT`) fill the options not passed.

        Anything but a mapping (or None) is the same ValueError as an unknown key. Through
        `torch.compile` a falsy value (`options=False`, `{}`, `0`) never arrives here: torch drops it
        before calling any backend, so it means the defaults, as it does for stock Inductor.
        """
        own = {f.name for f in dataclasses.fields(cls)}
        if options is None:
            options = {}
        if not isinstance(options, Mapping):
            raise ValueError(
                f"runlora options must be a dict of option names to values, got {options!r} "
                f"({type(options).__name__}); {_valid_keys_text(own)}")
        options = dict(options)
        kwargs: dict[str, Any] = {}
        inductor_patches: dict[str, Any] = {}
        unknown = []
        inductor_keys = None
        for key, value in options.items():
            if key in own:
                kwargs[key] = value
                continue
            if inductor_keys is None:
                from lora_rewrite.compat import inductor_config_keys

                inductor_keys = inductor_config_keys()
            if key in inductor_keys:
                inductor_patches[key] = value
            else:
                unknown.append(key)
        if unknown:
            raise ValueError(f"unknown runlora option(s) {sorted(unknown, key=repr)!r}; {_valid_keys_text(own)}")
        nested = kwargs.pop("inductor", {}) or {}
        if not isinstance(nested, Mapping):
            raise ValueError(f"runlora option 'inductor' must be a dict of Inductor config entries, got {nested!r}")
        if nested:
            from lora_rewrite.compat import inductor_config_keys

            bad = sorted(set(nested) - inductor_config_keys())
            if bad:
                raise ValueError(f"unknown Inductor config key(s) {bad!r} in runlora option 'inductor'")
        inductor_patches.update(nested)
        kwargs.setdefault("debug", _truthy_env(ENV_DEBUG))
        kwargs.setdefault("strict", _truthy_env(ENV_STRICT))
        if os.environ.get(ENV_DUMP_DIR):
            kwargs.setdefault("dump_dir", os.environ[ENV_DUMP_DIR])
        for key, value in (("rewrite", _env_switch(ENV_REWRITE)), ("criterion", _env_choice(ENV_CRITERION, CRITERIA)),
                           ("forms", _env_choice(ENV_FORMS, FORMS_CHOICES))):
            if value is not None:
                kwargs.setdefault(key, value)
        return cls(inductor=inductor_patches, **kwargs)


def _valid_keys_text(own: set[str]) -> str:
    return (f"valid runlora options are {sorted(own)!r} (plus any Inductor config key, as stock "
            f"torch.compile accepts)")


def _check_choice(key: str, value: Any, valid) -> None:
    if value not in valid:
        raise ValueError(f"runlora option {key!r} must be one of {list(valid)!r}, got {value!r}")
