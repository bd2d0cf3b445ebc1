"""The run contract: the methods, what one run leaves on disk, and its results record.

``tune run abmll_recipe`` writes a run directory; the reproduce scripts start runs and decide
which are finished; the reporting reads them back. All three use this module, so each fact is
written once:

* the **method registry** (:data:`METHODS`): the name a run records, its table label, its
  run-directory / ``--methods`` name, the packaged config (plus overrides, for a variant) and the
  learner component;
* the **run directory layout** (:class:`RunDir`)::

      OUTPUT_DIR/
          results.json               the results record (below); written once the test is measured
          checkpoints/recipe_state.pt   after every epoch: what a resumed run continues from
          adapter_best/ adapter_final/  PEFT exports (learners with adapters)
          logs/                      torchtune's metric logger
          stdout.log stderr.log      the reproduce scripts' capture of the run
          reproduce_failed.log       written by the reproduce scripts when the run failed

* the **results record** (:func:`results_record`, :func:`results_problem`) and when a run
  counts as finished (:meth:`RunDir.is_finished`);
* the **output directory policy** (:func:`prepare_output_dir`): never overwrite a run unless
  asked, resume only a checkpoint written with the same config.

Pure Python except :func:`prepare_output_dir` and the checkpoint helpers (torch, imported there),
so the reporting can read runs without importing torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from abmll.atomic import atomic_write, atomic_write_text

__all__ = [
    "Method",
    "METHODS",
    "METHOD_ORDER",
    "METHOD_LABELS",
    "ABMLL_METHODS",
    "PAPER_METHODS",
    "KNOWN_LEARNERS",
    "method",
    "recorded_method",
    "ICL_SUFFIX",
    "ESTIMATOR_SUFFIX",
    "ESTIMATOR_WORDS",
    "estimator_base",
    "estimator_method",
    "canonical_method",
    "method_label",
    "RESULTS_FILE",
    "CHECKPOINT_FILE",
    "FAILED_MARKER",
    "RunDir",
    "RunDirError",
    "results_record",
    "results_problem",
    "RESUME_MUTABLE_KEYS",
    "RESUME_ADDED_DEFAULTS",
    "with_added_defaults",
    "prepare_output_dir",
    "check_resume_config",
    "write_checkpoint",
    "TEST_METRICS",
]


# ------------------------------------------------------------------------------ methods
@dataclass(frozen=True)
class Method:
    name: str  # recorded in results.json ("method"): the learner's ``method_name``
    label: str  # in tables and figures
    key: str  # run directory and ``--methods`` name
    config: str  # packaged config stem: ``{profile}/{config}.yaml``
    learner: str  # the config's learner._component_
    overrides: Tuple[str, ...] = ()  # a variant: the config plus these overrides
    has_beta: bool = False  # results are grouped by learner.beta too
    in_paper: bool = True  # a row of the paper's Table 1 (what the scripts run by default)


#: Appended to the learner's method name by a run whose prompts carry in-context demonstrations
#: (``data.num_demonstrations`` > 0): :func:`recorded_method`.
ICL_SUFFIX = "-ICL"
_ICL = ("data.num_demonstrations=4",)  # the "+ ICL" rows: 4 solved examples (MetaICL's default is 16)
#: Appended by the reporting to a Gaussian method's row when its run trained with the estimator
#: that is not the default (``model.sampling``, :func:`estimator_method`): local reparameterisation
#: and one weight sample per forward are rows of their own, and never pooled as seeds.
ESTIMATOR_SUFFIX = {"local": "-L", "weight": "-W"}

# The paper's row order (Table 1), each variant after its method: "Pretrained + TTA" (LoRA from
# zero, test-time adaptation only), ABMLL with learner.outer_gradient=first_order, and the "+ ICL"
# rows (the paper's later version: the prompt also carries solved examples of the task).
METHODS: Tuple[Method, ...] = (
    Method("Pretrained", "Pretrained", "pretrained", "pretrained", "abmll.learners.Pretrained"),
    Method("PretrainedTTA", "Pretrained + TTA", "pretrained_tta", "pretrained", "abmll.learners.Pretrained",
           overrides=("learner.test_time_adaptation=true",), in_paper=False),
    Method("Pretrained-ICL", "Pretrained + ICL", "pretrained_icl", "pretrained", "abmll.learners.Pretrained",
           overrides=_ICL, in_paper=False),
    Method("RegularLoRA", "Regular LoRA", "regular_lora", "regular_lora", "abmll.learners.RegularLoRA"),
    Method("RegularLoRA-ICL", "Regular LoRA + ICL", "regular_lora_icl", "regular_lora", "abmll.learners.RegularLoRA",
           overrides=_ICL, in_paper=False),
    Method("StructuredLoRA", "Struct. LoRA", "structured_lora", "structured_lora", "abmll.learners.StructuredLoRA"),
    Method("Reptile", "Reptile", "reptile", "reptile", "abmll.learners.Reptile"),
    Method("ABMLL", "ABMLL", "abmll", "abmll", "abmll.learners.ABMLL", has_beta=True),
    Method("ABMLL-FO", "ABMLL (first-order)", "abmll_first_order", "abmll", "abmll.learners.ABMLL",
           overrides=("learner.outer_gradient=first_order",), has_beta=True, in_paper=False),
    Method("ABMLL-ICL", "ABMLL + ICL", "abmll_icl", "abmll", "abmll.learners.ABMLL",
           overrides=_ICL, has_beta=True, in_paper=False),
    # The other training estimator (issue 19, note 30): local reparameterisation, output noise
    # per token (the default before note 30, so every run from before model.sampling existed).
    Method("ABMLL-L", "ABMLL (local reparam.)", "abmll_local", "abmll", "abmll.learners.ABMLL",
           overrides=("model.sampling=local",), has_beta=True, in_paper=False),
)
_BY_NAME = {m.name: m for m in METHODS}
METHOD_ORDER: List[str] = [m.name for m in METHODS]
METHOD_LABELS: Dict[str, str] = {m.name: m.label for m in METHODS}
ABMLL_METHODS: Tuple[str, ...] = tuple(m.name for m in METHODS if m.has_beta)
PAPER_METHODS: Tuple[str, ...] = tuple(m.name for m in METHODS if m.in_paper)
KNOWN_LEARNERS: Tuple[str, ...] = tuple(dict.fromkeys(m.learner for m in METHODS))
# Other spellings people type or older results carry -> names.
_ALIASES = {
    **{m.key: m.name for m in METHODS},
    **{m.name.lower(): m.name for m in METHODS},
    **{m.label.lower(): m.name for m in METHODS},
    # The weight-sample row's names from before note 30 made "weight" the default: now ABMLL's.
    "abmll_weight": "ABMLL", "abmll-w": "ABMLL",
}


def canonical_method(name: str) -> str:
    """``"regular_lora"`` / ``"RegularLoRA"`` / ``"abmll.learners.RegularLoRA"`` -> ``"RegularLoRA"``;
    an unknown name is returned as it is (a results file may carry a method we do not know)."""
    short = str(name).rsplit(".", 1)[-1] if "learners." in str(name) else str(name)
    if short in _BY_NAME:
        return short
    return _ALIASES.get(short.lower(), short)


def method(name: str) -> Method:
    """The registry entry for any spelling of a method; ``KeyError`` naming the choices."""
    found = _BY_NAME.get(canonical_method(name))
    if found is None:
        raise KeyError(f"unknown method {name!r} (choose from {', '.join(m.key for m in METHODS)})")
    return found


#: How a row's label names the training estimator it adds (:func:`estimator_method`).
ESTIMATOR_WORDS = {"local": "local reparam.", "weight": "weight sample"}


def _split_estimator(name: str) -> Tuple[str, Optional[str]]:
    """``"ABMLL-FO-L"`` -> ``("ABMLL-FO", "local")``: the registry method a row varies by its
    training estimator, and that estimator; any other name -> ``(name, None)``."""
    if name not in _BY_NAME:
        for sampling, suffix in ESTIMATOR_SUFFIX.items():
            if name.endswith(suffix) and name[: -len(suffix)] in _BY_NAME:
                return name[: -len(suffix)], sampling
    return name, None


def estimator_base(name: str) -> str:
    """The registry method a row varies by its estimator (``"ABMLL-FO-L"`` -> ``"ABMLL-FO"``);
    any other name as it is."""
    return _split_estimator(name)[0]


def method_label(name: str) -> str:
    """The row's label; a variant's run with the other estimator (``"ABMLL-FO-L"``) is its
    method's label with the estimator's words, ``"ABMLL (first-order) (local reparam.)"``."""
    base, sampling = _split_estimator(name)
    if sampling is not None:
        return f"{METHOD_LABELS[base]} ({ESTIMATOR_WORDS[sampling]})"
    return METHOD_LABELS.get(name, name)


def estimator_method(method_name: str, sampling: Optional[str]) -> str:
    """The row of a Gaussian run: ``method_name`` as recorded, plus :data:`ESTIMATOR_SUFFIX` of its
    ``model.sampling`` unless that is the default. ``None`` is a run from before the key, which
    trained with ``local`` (:data:`RESUME_ADDED_DEFAULTS`), whatever the default is now.
    ``("ABMLL", "local")`` -> ``"ABMLL-L"`` while ``weight`` is the default."""
    from abmll.modules import DEFAULT_SAMPLING

    if sampling is None:
        sampling = RESUME_ADDED_DEFAULTS[("model", "sampling")]
    suffix = ESTIMATOR_SUFFIX.get(sampling, f"-{sampling}")
    if sampling == DEFAULT_SAMPLING or method_name.endswith(suffix):  # named already
        return method_name
    return f"{method_name}{suffix}"


def recorded_method(method_name: str, num_demonstrations: int = 0) -> str:
    """The name a run records in results.json: its learner's ``method_name``, plus
    :data:`ICL_SUFFIX` when its prompts carry demonstrations (``"ABMLL"`` -> ``"ABMLL-ICL"``), so
    that zero-shot and in-context runs of one learner are separate rows of every table."""
    return f"{method_name}{ICL_SUFFIX}" if num_demonstrations else method_name


# ------------------------------------------------------------------------------ layout
RESULTS_FILE = "results.json"
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_FILE = "recipe_state.pt"
FAILED_MARKER = "reproduce_failed.log"


class RunDirError(ValueError):
    """The output directory cannot be used as asked (it holds a run, or a checkpoint that does
    not fit the config); one line naming the key to change."""


@dataclass(frozen=True)
class RunDir:
    """The files of one run under ``root`` (the recipe's ``output_dir``)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def results(self) -> Path:
        return self.root / RESULTS_FILE

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINT_DIR

    @property
    def checkpoint(self) -> Path:
        return self.checkpoints / CHECKPOINT_FILE

    def adapter(self, which: str) -> Path:
        """PEFT export directory: ``which`` is ``"best"`` or ``"final"``."""
        return self.root / f"adapter_{which}"

    def predictions(self, which: str) -> Path:
        """Per-example predictions (Parquet): ``which`` is ``"test"`` or ``"val_epoch{N}"``."""
        return self.root / f"predictions_{which}.parquet"

    @property
    def stdout(self) -> Path:
        return self.root / "stdout.log"

    @property
    def stderr(self) -> Path:
        return self.root / "stderr.log"

    @property
    def failed_marker(self) -> Path:
        return self.root / FAILED_MARKER

    @staticmethod
    def of_checkpoint(checkpoint: Path) -> "RunDir":
        """The run a ``recipe_state.pt`` found on disk belongs to."""
        parent = Path(checkpoint).parent
        return RunDir(parent.parent if parent.name == CHECKPOINT_DIR else parent)

    def read_results(self) -> Optional[Dict[str, Any]]:
        """The parsed results.json; None if there is none or it cannot be parsed."""
        try:
            data = json.loads(self.results.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def is_finished(self) -> bool:
        """Nothing left to do: the test was measured and every optional end step (pruning,
        export) succeeded. A run with ``errors`` is resumed, and the recipe redoes its end."""
        data = self.read_results()
        return data is not None and data.get("finished") is True and not data.get("errors")

    def write_results(self, record: Mapping[str, Any]) -> Path:
        return atomic_write_text(self.results, json.dumps(record, indent=2))


# ------------------------------------------------------------------------------ results record
_REQUIRED_KEYS = ("method", "split", "seed", "test", "val_at_best")
#: The test metrics of a results record (``test.mean``, ``test.pooled``, each task of
#: ``test.per_task``): what :mod:`abmll.evaluation` computes and the reporting reads.
TEST_METRICS = ("accuracy", "ece", "nll", "brier", "aurc", "acc_at_50", "acc_at_80", "acc_at_90", "mi")


def results_record(
    *,
    method: str,
    learner: Optional[str],
    split: str,
    split_file: Optional[str],
    task_lists_sha256: str,
    seed: int,
    best_epoch: Optional[int],
    epochs: int,
    val_at_best: Optional[Dict[str, float]],
    test: Mapping[str, Any],
    history: List[Dict[str, Any]],
    posterior: Optional[Dict[str, Any]] = None,
    predictions: Optional[str] = None,
    config: Dict[str, Any],
    errors: Dict[str, str],
    precision: Optional[Dict[str, Any]] = None,
    data: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """The record a finished run writes to results.json (the reporting reads exactly this)."""
    return {
        "method": method,
        "learner": learner,
        "split": split,
        # Which tasks, not only the split's name: a data.split_file can reuse a name.
        "split_file": split_file,
        "task_lists_sha256": task_lists_sha256,
        "seed": seed,
        "best_epoch": best_epoch,
        "epochs": epochs,
        "val_at_best": val_at_best,
        "test": {
            "mean": test["mean"], "pooled": test["pooled"], "per_task": test["per_task"],
            # the headline's sample count, and with a list of counts the curve over them
            "num_samples": test.get("num_samples", 1),
            "samples_curve": test.get("samples_curve"),
        },
        # The temperature-scaling control: one temperature per task fitted by NLL on its support
        # examples after adaptation (None when eval.temperature_scaling is off).
        "test_ts": test.get("ts"),
        # The learned variances against c, and the flip rate (Gaussian models; else None).
        "posterior": posterior,
        "predictions": predictions,  # the per-example predictions file beside this one
        "pruning": {},  # filled in fraction by fraction after the test
        "history": history,
        # The prompts: in-context demonstrations (data.num_demonstrations, where they come from)
        # and what the test's prompts cost in tokens (abmll.data.summarize_prompt_lengths).
        "data": data,
        "config": config,
        # The compute dtype actually used (config dtype: auto resolves per machine), why, the CPU
        # capability and threads: abmll.precision.Precision.record.
        "precision": precision,
        # The test is measured: the run's result is final even if an optional step fails.
        "finished": True,
        "errors": errors,  # optional steps that failed: {"pruning" | "export": message}
    }


def results_problem(data: Any) -> Optional[str]:
    """Why this parsed JSON is not a usable finished results record (None if it is)."""
    if not isinstance(data, dict):
        return "not a JSON object"
    if data.get("finished") is not True:
        return 'results.json without "finished": true'
    for key in _REQUIRED_KEYS:
        if key not in data:
            return f"missing key {key!r}"
    test = data["test"]
    if not isinstance(test, dict) or not isinstance(test.get("mean"), dict):
        return "missing test.mean"
    for metric in ("accuracy", "ece"):
        if not isinstance(test["mean"].get(metric), (int, float)):
            return f"missing test.mean.{metric}"
        val = data["val_at_best"]
        if val is not None and not isinstance(val.get(metric) if isinstance(val, dict) else None, (int, float)):
            return f"missing val_at_best.{metric}"
    return None


# ------------------------------------------------------------------------------ output dir policy
# Keys a resumed run may change without changing the trajectory it continues. Activation
# checkpointing only trades memory for recomputation (the recomputed forward replays the same
# RNG state; only floating-point rounding differs), and adapter names do not depend on it
# (abmll.modules.names), so a run may resume with it on or off. The same holds for compile
# (torch.compile keeps eager's random draws and the parameter names: abmll.compiling).
RESUME_MUTABLE_KEYS = (
    "epochs",
    "stop_after_epoch",
    "resume_from_checkpoint",
    "overwrite",
    "metric_logger",
    "enable_activation_checkpointing",
    "compile",
)


#: Keys the configs gained after runs were checkpointed, with what their absence means (the
#: builder's default): a checkpoint written before ``model.sampling`` existed continues under a
#: config that says ``model.sampling: local``, and is refused under ``model.sampling: weight``.
RESUME_ADDED_DEFAULTS: Dict[Tuple[str, str], Any] = {("model", "sampling"): "local", ("data", "num_demonstrations"): 0}


def with_added_defaults(config: Mapping[str, Any]) -> Dict[str, Any]:
    """``config`` with each key of :data:`RESUME_ADDED_DEFAULTS` that it lacks set to the value
    runs from before that key used (a config written before the key existed)."""
    out = dict(config)
    for (section, key), value in RESUME_ADDED_DEFAULTS.items():
        node = out.get(section)
        if isinstance(node, Mapping) and key not in node:
            out[section] = {**node, key: value}
    return out


def check_resume_config(now: Mapping[str, Any], saved: Mapping[str, Any]) -> None:
    """Refuse to continue a checkpoint written with a different config (top-level keys; a key
    in :data:`RESUME_ADDED_DEFAULTS` that one side lacks counts as its default)."""
    now, saved = with_added_defaults(now), with_added_defaults(saved)
    for key in sorted(set(now) | set(saved)):
        if key in RESUME_MUTABLE_KEYS:
            continue
        if now.get(key) != saved.get(key):
            raise RunDirError(
                f"resume_from_checkpoint: config key '{key}' differs from the checkpointed run "
                f"({saved.get(key)!r} there, {now.get(key)!r} now); only "
                f"{', '.join(RESUME_MUTABLE_KEYS)} may change on resume"
            )


def prepare_output_dir(
    run: RunDir, config: Mapping[str, Any], *, resume: bool, overwrite: bool,
    log: Callable[[str], None] = print,
) -> Optional[Dict[str, Any]]:
    """Decide what to do with ``run`` before anything is written to it; return the checkpoint
    to resume from (None: start from scratch).

    * ``resume``: continue the checkpoint if there is one (its config must equal ``config``
      up to :data:`RESUME_MUTABLE_KEYS`), else start from scratch;
    * a directory that holds a run is never overwritten unless ``overwrite``, which removes
      the old checkpoint and results first (adapters are re-exported at the end of the run).
    """
    import torch

    if resume:
        if run.checkpoint.exists():
            state = torch.load(run.checkpoint, map_location="cpu", weights_only=False)
            check_resume_config(config, state["config"])
            log(f"Resuming from {run.checkpoint} (after epoch {state['epoch']})")
            return state
        log(f"resume_from_checkpoint=True but {run.checkpoint} does not exist: starting from scratch")
    elif (run.checkpoint.exists() or run.results.exists()) and not overwrite:
        held = run.results if run.results.exists() else run.checkpoint
        raise RunDirError(
            f"output_dir {run.root} already holds a run ({held}); set resume_from_checkpoint=True "
            f"to continue it, overwrite=True to replace it, or choose another output_dir"
        )
    if overwrite:
        for stale in (run.checkpoint, run.results):
            stale.unlink(missing_ok=True)
    return None


def write_checkpoint(run: RunDir, state: Dict[str, Any]) -> None:
    """Write the recipe state atomically: a stop mid-write leaves the previous checkpoint."""
    import torch

    run.checkpoints.mkdir(parents=True, exist_ok=True)
    atomic_write(run.checkpoint, lambda tmp: torch.save(state, tmp))
