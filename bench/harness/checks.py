"""Every input of a job checked before any work, in one place.

``check_config(cfg)``   the composed config alone (no data, no model): every key at the
                        top level and in every node (model, task, partition, game, train,
                        logger, budget, lds, selection, slurm) type- and range-checked by
                        its ``Settings`` class, nothing unknown, nothing missing, nothing
                        left ``???``; the valuer list and every valuer's settings
                        (``build.check_valuers``); settings that make a reported metric
                        meaningless.

What needs the data (the eval set, LDS subsets, detection's clean class, selection
sizes) is ``build.check_inputs``, which ``build_game`` calls before the game exists.

The command line runs ``check_config`` on the config Hydra composes before Hydra starts
(so a bad setting writes nothing), and again in every job of a sweep. Each failure is a
``ConfigError``: one line naming the setting and what to set instead.
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass, fields

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from bench.core.errors import ConfigError
from bench.core.game import GAMES
from bench.core.hh_rlhf import HHSettings
from bench.core.models import ModelSpec
from bench.core.partition import PartitionSettings
from bench.core.selection import METHODS as SELECTION_METHODS
from bench.core.settings import Settings, setting
from bench.core.task import LocalSettings, SyntheticSettings
from bench.core.train import METRICS, TrainSettings
from bench.harness.build import check_valuers

TASKS = {"synthetic_pref": SyntheticSettings, "local_pref": LocalSettings, "hh_rlhf": HHSettings}
REQUIRED = MISSING


@dataclass(frozen=True)
class JobSettings(Settings):
    """The top level of ``conf/config.yaml``: every key required (the YAML gives the defaults)."""
    prefix = ""
    experiment_name: str = setting(REQUIRED, "names the records file <results_dir>/runs/<experiment_name>.jsonl")
    seeds: list[int] = setting(REQUIRED, "training seeds of the game (>= 2; >= 3 for a consensus reference and "
                                         "intervals): every seed's game is trained, each valuer runs on each",
                               min=0)
    valuer: dict = setting(REQUIRED, "the selected valuers' configs (group conf/valuer): valuer=[loo,shed], "
                                     "valuer.<name>.<key>=<value>")
    budget: dict = setting(REQUIRED, "max_fine_tunes, max_seconds of every valuer")
    lds: dict = setting(REQUIRED, "linear datamodeling score settings")
    verdicts: dict = setting(REQUIRED, "the leaderboard's equivalence margin and false-discovery rate")
    selection: dict = setting(REQUIRED, "data-selection curve settings")
    n_jobs: int = setting(REQUIRED, "coalitions trained in parallel worker processes", min=1)
    slurm: dict = setting(REQUIRED, "hydra/launcher=slurm settings")
    results_dir: str = setting(REQUIRED, "run records: <results_dir>/runs/<experiment>.jsonl")
    cache_dir: str = setting(REQUIRED, "the utility cache")
    truth: str = setting(REQUIRED, "the ground truth: auto (results/published/truth/<experiment_name>/ when it is "
                                 "this game's) | off (retrain) | a folder `python -m bench truth export` wrote")
    progress: bool = setting(REQUIRED, "progress bars")
    model: dict = setting(REQUIRED, "the base model (conf/model)")
    task: dict = setting(REQUIRED, "the preference data (conf/task)")
    partition: dict = setting(REQUIRED, "owners and planted noise (conf/partition)")
    game: dict = setting(REQUIRED, "the cooperative game (conf/game)")
    train: dict = setting(REQUIRED, "DPO fine-tuning (conf/train)")
    logger: dict = setting(REQUIRED, "W&B logging (conf/logger)")

    def check(self) -> None:
        name = self.experiment_name
        if not name.strip() or "/" in name or name.startswith("."):
            raise self.error("experiment_name", f"{name!r}; use a non-empty name without '/' (it names the "
                                                f"records file), e.g. experiment_name=my_run")
        if len(self.seeds) < 2:
            raise self.error("seeds", f"{self.seeds}: a valuation is scored against the exact values of the other "
                                      f"seeds, so one seed has no reference; give >= 2 (>= 3 for intervals), "
                                      f"e.g. seeds=[0,1,2]")
        twice = sorted({s for s in self.seeds if self.seeds.count(s) > 1})
        if twice:
            raise self.error("seeds", f"{twice} listed twice (a seed repeated is the same fine-tunes, no new "
                                      f"information); name each seed once, e.g. seeds=[0,1,2]")


@dataclass(frozen=True)
class GameSettings(Settings):
    """The ``game`` config node."""
    prefix = "game"
    kind: str = setting("union", "union (DPO on the pooled data of S) | sequential (stage by stage)", choices=GAMES)
    metric: str = setting("pref_acc", "the utility: " + " | ".join(METRICS), choices=METRICS)
    shard: str | int | None = setting(None, "i/k: train only slice i of k of the ground truth; assemble: check "
                                            "every slice is cached, then run")
    device: str = setting("auto", "where every pass runs (training, scoring, valuers' models): auto (cuda if "
                                  "available, else cpu) | cpu | cuda | cuda:N")
    pack: int = setting(1, "coalitions trained at once as LoRA adapters on one base (1 = one by one)", min=1)
    deterministic: bool = setting(True, "CUDA: deterministic kernels (CUBLAS_WORKSPACE_CONFIG, torch's "
                                        "deterministic algorithms; warns where an op has none); false = faster, "
                                        "not bit-identical run to run. The CPU is deterministic either way")

    def check(self) -> None:
        import re

        from bench.core.models import DEVICE_PATTERN
        from bench.core.shard import parse_shard
        parse_shard(self.shard)
        if not re.fullmatch(DEVICE_PATTERN, str(self.device)):
            raise self.error("device", f"unknown {self.device!r}; use auto, cpu, cuda or cuda:N")
        from bench.core.devices import check_device
        check_device(self.device, "game.device")      # usable by this torch, here: one line, before any work


@dataclass(frozen=True)
class LdsSettings(Settings):
    """The ``lds`` config node (linear datamodeling score of point-valued valuers)."""
    prefix = "lds"
    n_subsets: int = setting(REQUIRED, "M random subsets retrained through the game; 0 = off", min=0)
    frac: float = setting(REQUIRED, "each subset's share of the training examples, in (0, 1)", min=0,
                          min_exclusive=True, max=1, max_exclusive=True)
    seed: int = setting(REQUIRED, "seed of the subsets (and of the bootstrap draws)", min=0)
    seeds: list[int] = setting(REQUIRED, "training seeds every subset is retrained under: >= 2 (the ceiling), "
                                         "disjoint from the job's seeds (the valuations')", min=0)

    def check(self) -> None:
        if 0 < self.n_subsets < 3:
            raise self.error("n_subsets", f"{self.n_subsets} subsets give no rank correlation; use >= 3 "
                                          f"(e.g. 16), or 0 to turn LDS off")
        if self.n_subsets and len(set(self.seeds)) < 2:
            raise self.error("seeds", f"{self.seeds}: the LDS ceiling needs the subsets under >= 2 distinct seeds, "
                                      f"e.g. lds.seeds=[100,101]")


@dataclass(frozen=True)
class VerdictSettings(Settings):
    """The ``verdicts`` config node: declared before the run, read by the leaderboard."""
    prefix = "verdicts"
    margin: float = setting(REQUIRED, "equivalence margin δ in ρ: '≈' only when a TOST shows |difference| < δ",
                            min=0, min_exclusive=True, max=2)
    alpha: float = setting(REQUIRED, "false-discovery rate of the marks (Benjamini–Hochberg within a table)",
                           min=0, min_exclusive=True, max=1, max_exclusive=True)


@dataclass(frozen=True)
class SelectionSettings(Settings):
    """The ``selection`` config node (experiment=selection)."""
    prefix = "selection"
    valuers: list[str] = setting(REQUIRED, "point-valued valuers to put through the selection curve")
    sizes: list[float] = setting(REQUIRED, "shares (floats in (0, 1]) or counts (integers >= 1) of the "
                                           "training examples", min=0, min_exclusive=True)
    seeds: list[int] = setting(REQUIRED, "subset draws and training seeds (>= 2 for a confidence interval; "
                                         "a seed listed twice would repeat a draw)", min=0)
    methods: list[str] = setting(REQUIRED, "qocs | qwcs | random | all", choices=SELECTION_METHODS)
    beta: float = setting(REQUIRED, "QWCS: clusters ~ softmax(beta x z-scored score)")

    def check(self) -> None:
        for i, s in enumerate(self.sizes):
            if isinstance(s, float) and s > 1:
                raise self.error(f"sizes[{i}]", f"{s}: a float is a share in (0, 1]; write a count as an "
                                                f"integer (e.g. {int(s)})")
        for name in ("valuers", "sizes", "seeds", "methods"):
            items = getattr(self, name)
            twice = sorted({repr(x) for x in items if items.count(x) > 1})
            if twice:
                raise self.error(name, f"{', '.join(twice)} listed twice; name each once")
        if self.valuers:
            if not self.methods:
                raise self.error("methods", "empty; choose from " + ", ".join(SELECTION_METHODS))
            if not self.seeds:
                raise self.error("seeds", "empty; give at least one seed (>= 2 for a confidence interval), "
                                          "e.g. selection.seeds=[0,1,2]")


@dataclass(frozen=True)
class LoggerSettings(Settings):
    """The ``logger`` config node (its mode is checked by ``WandbLogger.check``)."""
    prefix = "logger"
    mode: str | bool | None = setting("offline", "offline | online | disabled")
    project: str = setting("dvbench", "the W&B project")
    dir: str = setting("results/wandb", "the W&B run folder")


@dataclass(frozen=True)
class SlurmSettings(Settings):
    """The ``slurm`` config node, read by hydra/launcher=slurm."""
    prefix = "slurm"
    partition: str | None = setting(None, "SLURM partition")
    account: str | None = setting(None, "SLURM account")
    gpus_per_node: int | None = setting(1, "GPUs per job (null: none requested, for a CPU-only partition)", min=0)
    cpus_per_task: int = setting(4, "CPUs per job", min=1)
    mem_gb: float = setting(24, "memory per job in GB", min=0, min_exclusive=True)
    timeout_min: int = setting(240, "time limit per job in minutes", min=1)
    array_parallelism: int = setting(16, "jobs of an array running at once", min=1)


NODES = {"game": GameSettings, "lds": LdsSettings, "verdicts": VerdictSettings, "selection": SelectionSettings, "logger": LoggerSettings,
         "slurm": SlurmSettings, "train": TrainSettings, "model": ModelSpec, "partition": PartitionSettings}


def _container(cfg: DictConfig) -> dict:
    """The config as plain data, every interpolation resolved; ``???`` and unresolvable
    values as one line naming the key."""
    try:
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise ConfigError(f"{missing[0]}: required, the config leaves it ???; set {missing[0]}=<value>")
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "config"
        raise ConfigError(f"{key}: cannot resolve ({str(e).splitlines()[0]}); fix the ${{...}} reference") from None


def task_settings(task: dict):
    """The task node's settings for its kind; keys another kind's experiment set are
    left out (``build_task`` prints which)."""
    kind = task.get("kind")
    if kind not in TASKS:
        raise ConfigError(f"task.kind: unknown {kind!r}; choose one of {list(TASKS)}")
    cls = TASKS[kind]
    names = {f.name for f in fields(cls)}
    return cls.of({k: v for k, v in task.items() if k in names}, prefix="task")


def check_config(cfg: DictConfig) -> tuple[dict, dict]:
    """Every setting of a composed config (see the module docstring); returns it as plain
    data and the valuers it selects, built (``build.check_valuers``)."""
    c = _container(cfg)
    job = JobSettings.of(c, prefix="")
    from bench.harness.truth import check_truth_setting
    check_truth_setting(job.truth, job.experiment_name)
    both = sorted(set(c["lds"].get("seeds") or []) & set(job.seeds))
    if c["lds"]["n_subsets"] and both:
        free = [s for s in range(100, 200) if s not in job.seeds][:2]
        raise ConfigError(f"lds.seeds: {both} are also valuation seeds {job.seeds}, so valuations would be scored "
                          f"against fine-tunes with their own initialisation and data order; use disjoint seeds, "
                          f"e.g. lds.seeds=[{free[0]},{free[1]}]")
    for node, cls in NODES.items():
        cls.of(c[node], prefix=node)
    task_settings(c["task"])
    from bench.core.valuation import Budget
    Budget.of(c["budget"], prefix="budget")
    train, model = c["train"], c["model"]
    if model.get("kind", "tiny") == "tiny":
        n_pos = model.get("n_positions", ModelSpec().n_positions)
        max_len = train.get("max_length", TrainSettings().max_length)
        if max_len > n_pos:
            raise ConfigError(f"train.max_length: {max_len} exceeds model.n_positions={n_pos}, the tiny model's "
                              f"longest sequence; lower train.max_length or raise model.n_positions")
    valuers = check_valuers(c)           # every valuer's settings, by building it
    names = list(valuers)
    bad = [n for n in c["selection"]["valuers"] if n not in names]
    if bad:
        raise ConfigError(f"selection.valuers: {bad} are not selected (valuer={names}); select them, "
                          f"e.g. valuer=[{','.join(names[2:] + bad)}], or drop them from selection.valuers")
    return c, valuers
