"""Sweeps beyond one process (issue 21): Hydra's launcher plugins, the Optuna search on val
classes, the refusal of a search on novel classes, and the GPU configs and check script.

The sweeps run the entry points as real subprocesses on ``episode_dataset`` with a tiny random
RGB VideoViT export (as ``test_eval.py``'s fixture builds it):

* one two-job ``lit_main_eval.py -m fewshot.k_shot=1,2`` sweep per launcher: Hydra's
  basic launcher, ``hydra/launcher=submitit_local`` (each job a process of its own) and
  ``hydra/launcher=joblib`` (two worker processes); the combined results tables must agree;
* ``experiment=search/mm_cdfsl_tiny_lr`` cut to 3 one-epoch trials: Optuna maximises val/acc;
* an Optuna sweep of ``lit_main_eval.py`` on the novel classes: refused before any trial runs.

The SLURM launcher is checked without a cluster: the plugin's own ``launch`` runs on the
composed config up to the ``sbatch`` call, which is intercepted to read the submission file.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from helpers import tiny

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"
SWEEP = ["fewshot.k_shot=1,2", "fewshot.n_way=3", "fewshot.n_query=3", "fewshot.episodes=10"]
LAUNCHERS = {
    "basic": [],
    "submitit_local": ["hydra/launcher=submitit_local"],
    "joblib": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
}
PID_LOG = "hydra.job_logging.formatters.simple.format='%(process)d|%(message)s'"


# --------------------------------------------------------------------------- fixtures and runners


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An exported RGB ``ModalityEncoder`` around a 1-block, 32-wide ``VideoViT`` (random,
    seeded), with the modality and frame configs the rgb modality and synthetic data compose."""
    from hydra.utils import instantiate

    from mmfsar.models.base import export_encoder
    from mmfsar.tasks.common import modality_encoder_config

    composed = OmegaConf.create(
        {
            "input": OmegaConf.load(CONFIG_DIR / "input" / "synthetic.yaml"),
            "modality": OmegaConf.load(CONFIG_DIR / "modality" / "rgb.yaml"),
            "frames": OmegaConf.load(CONFIG_DIR / "data" / "synthetic.yaml").frames,
            "backbone": OmegaConf.load(CONFIG_DIR / "model" / "encoder" / "vit_tiny.yaml"),
        }
    )
    modality = OmegaConf.to_container(composed.modality, resolve=True)
    frames = OmegaConf.to_container(composed.frames, resolve=True)
    backbone = OmegaConf.to_container(composed.backbone)
    backbone.update(patch_size=16, embed_dim=32, depth=1, num_heads=2)
    inputs = {"num_frames": frames["num_frames"], "in_channels": 3, "img_size": modality["size"]}
    config = modality_encoder_config(backbone, "rgb", inputs)
    torch.manual_seed(0)
    encoder = instantiate(config, _convert_="all")
    path = tmp_path_factory.mktemp("tiny_encoder") / "encoder.pt"
    return export_encoder(
        path, encoder, encoder_config=config, modalities={"rgb": modality}, frames=frames, info={"task": "test"}
    )


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("launchers")


@dataclass
class Run:
    returncode: int
    stdout: str  # stdout and stderr together
    pid: int


def run(script: str, *overrides: str, expect_ok: bool = True, timeout: float = 300) -> Run:
    """``python <script> overrides...`` in the repository."""
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, script, *overrides]
    pipe = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, **pipe) as proc:
        stdout, _ = proc.communicate(timeout=timeout)
    if expect_ok and proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)}\nexited with {proc.returncode}; output tail:\n{stdout[-6000:]}", pytrace=False)
    return Run(proc.returncode, stdout, proc.pid)


def table(sweep: Path) -> list[dict[str, str]]:
    with (sweep / "results_table.csv").open() as f:
        return list(csv.DictReader(f))


def compose(name: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import mmfsar.utils  # noqa: F401  (MMFSAR_ROOT)

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(name, overrides=overrides, return_hydra_config=True)


@pytest.fixture(scope="module")
def eval_sweeps(work: Path, episode_dataset: Path, tiny_encoder: Path) -> dict[str, tuple[Path, int]]:
    """The same two-job evaluation sweep through each launcher: launcher name -> (sweep folder,
    process id of the sweep). Every line of a job's log starts with the id of its process."""
    common = [f"encoder={tiny_encoder}", "data=folder", f"data.root={episode_dataset}", "data.eval_batch_size=16"]
    common += ["data.num_workers=0", "++trainer.enable_progress_bar=false", *SWEEP, PID_LOG]
    sweeps = {}
    for name, launcher in LAUNCHERS.items():
        sweep = work / f"eval_{name}"
        sweeps[name] = sweep, run("lit_main_eval.py", "-m", *launcher, *common, f"hydra.sweep.dir={sweep}").pid
    return sweeps


def job_processes(sweep: Path, job: int) -> set[int]:
    """The process ids in a job's log (``PID_LOG``)."""
    return {int(m) for m in re.findall(r"^(\d+)\|", (sweep / str(job) / "eval.log").read_text(), flags=re.M)}


# --------------------------------------------------------------------------- launchers


def test_every_launcher_writes_the_same_results_table(eval_sweeps):
    basic = table(eval_sweeps["basic"][0])
    assert [(r["job"], r["setting"]) for r in basic] == [("0", "3-way 1-shot"), ("1", "3-way 2-shot")]
    for name in ("submitit_local", "joblib"):
        sweep = eval_sweeps[name][0]
        assert table(sweep) == basic, f"{name}: another results table than the basic launcher's"
        assert len((sweep / "results_table.md").read_text().strip().splitlines()) == 2 + 2
        assert (sweep / "accuracy_vs_shots.png").stat().st_size > 1000


def test_launcher_plugins_ran_the_jobs_in_other_processes(eval_sweeps):
    """The basic launcher runs the jobs in the sweep's process; submitit's local executor starts
    one process per job (the job's id: the process it started), joblib runs them in loky workers."""
    sweep, main = eval_sweeps["basic"]
    assert job_processes(sweep, 0) == job_processes(sweep, 1) == {main}

    sweep, main = eval_sweeps["submitit_local"]
    jobs = [job_processes(sweep, n) for n in range(2)]
    assert all(len(pids) == 1 for pids in jobs) and jobs[0] != jobs[1] and main not in jobs[0] | jobs[1], (main, jobs)
    for n in range(2):
        job_id = str(OmegaConf.load(sweep / str(n) / ".hydra" / "hydra.yaml").hydra.job.id)
        assert (sweep / ".submitit" / job_id / f"{job_id}_0_result.pkl").is_file()

    sweep, main = eval_sweeps["joblib"]
    jobs = [job_processes(sweep, n) for n in range(2)]
    assert all(pids and main not in pids for pids in jobs), (main, jobs)


class _Submitted(Exception):
    pass


def sbatch_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, overrides: list[str]) -> str:
    """The sbatch file the SLURM launcher would submit for a 2-job sweep of ``lit_main_pretrain.py``
    composed with ``overrides`` (the plugin's launch, up to the sbatch call)."""
    from hydra.core.plugins import Plugins
    from submitit.slurm.slurm import SlurmExecutor

    def submit(self, command):
        raise _Submitted(self._make_submission_file_text(command, "uid"))

    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # "srun is here"
    monkeypatch.setattr(SlurmExecutor, "_submit_command", submit)
    cfg = compose("pretrain", ["hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path}", *overrides])
    launcher = Plugins.instance()._instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    with pytest.raises(_Submitted) as submitted:
        launcher.launch([["modality=rgb"], ["modality=flow"]], initial_job_idx=0)
    return str(submitted.value)


def test_slurm_launcher_takes_nodes_tasks_and_gpus_from_the_trainer(tmp_path, monkeypatch):
    ddp = ["trainer=gpu_ddp", "trainer.devices=4", "trainer.num_nodes=2", "hydra.launcher.partition=gpu"]
    text = sbatch_file(tmp_path, monkeypatch, ddp)
    flags = ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu", "--time=240", "--array=0-1%2")
    for flag in flags:
        assert f"#SBATCH {flag}\n" in text, f"{flag} missing:\n{text}"
    assert "srun" in text, "every task is started by srun: Lightning's SLURMEnvironment reads its rank there"

    cpu = ["hydra.launcher.gpus_per_node=null", "hydra.launcher.timeout_min=30"]
    text = sbatch_file(tmp_path / "cpu", monkeypatch, cpu)
    assert "#SBATCH --nodes=1\n" in text and "#SBATCH --ntasks-per-node=1\n" in text and "#SBATCH --time=30\n" in text
    assert "--gpus-per-node" not in text and "--partition" not in text


def test_gpu_ddp_trainer_is_nccl_bf16():
    from hydra.utils import instantiate

    cfg = compose("pretrain", ["trainer=gpu_ddp", "trainer.devices=4", "trainer.num_nodes=2"])
    assert (cfg.trainer.accelerator, cfg.trainer.precision, cfg.trainer.num_nodes) == ("gpu", "bf16-mixed", 2)
    strategy = instantiate(cfg.trainer.strategy)
    assert type(strategy).__name__ == "DDPStrategy" and strategy._process_group_backend == "nccl"
    assert compose("pretrain", ["trainer=gpu"]).trainer.precision == "bf16-mixed"


# --------------------------------------------------------------------------- Optuna on val classes


def test_optuna_search_maximises_val_acc(work, episode_dataset):
    sweep = work / "search"
    run(
        "lit_main_pretrain.py",
        "-m",
        "experiment=search/mm_cdfsl_tiny_lr",
        "modality=rgb",
        "hydra.sweeper.n_trials=3",
        f"hydra.sweep.dir={sweep}",
        *tiny(episode_dataset),
    )
    from mmfsar.models.base import load_export

    trials = {}
    for n in range(3):
        job = sweep / str(n)
        overrides = dict(o.split("=", 1) for o in OmegaConf.load(job / ".hydra" / "overrides.yaml"))
        params = {k: float(overrides[k]) for k in ("model.optim.optimizer.lr", "model.optim.optimizer.weight_decay")}
        trials[n] = (params, load_export(job / "encoder.pt")["info"]["val_acc"])  # the run's val/acc (one validation)
    assert not (sweep / "3").exists(), "hydra.sweeper.n_trials=3"
    lrs = [p["model.optim.optimizer.lr"] for p, _ in trials.values()]
    assert len(set(lrs)) == 3 and all(3e-4 <= lr <= 3e-2 for lr in lrs)
    assert all(0.0 <= p["model.optim.optimizer.weight_decay"] <= 0.1 for p, _ in trials.values())

    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    best_params, best_val = max(trials.values(), key=lambda t: t[1])
    assert result["best_value"] == pytest.approx(best_val, abs=1e-6), "the objective is the trials' val/acc, maximised"
    assert result["best_params"] == pytest.approx(best_params)
    sweeper = OmegaConf.load(sweep / "0" / ".hydra" / "hydra.yaml").hydra.sweeper
    assert sweeper.direction == "maximize"
    assert sweeper.custom_search_space == "mmfsar.utils.sweeps.refuse_novel_objective"


def test_optuna_search_on_novel_classes_is_refused_before_any_trial(work, episode_dataset, tiny_encoder):
    sweep = work / "novel_search"
    proc = run(
        "lit_main_eval.py",
        "-m",
        "hydra/sweeper=optuna_val",
        "hydra.sweeper.n_trials=2",
        f"encoder={tiny_encoder}",
        "data=folder",
        f"data.root={episode_dataset}",
        "fewshot.episodes=10",
        f"hydra.sweep.dir={sweep}",
        expect_ok=False,
    )
    assert proc.returncode != 0
    assert "ConfigError: fewshot.split=novel under the sweeper" in proc.stdout, proc.stdout[-3000:]
    assert not list(sweep.glob("*/results.json")) and not (sweep / "0").exists(), "no trial may run"


def test_plugin_optuna_config_is_refused_in_the_job(work, episode_dataset, tiny_encoder):
    """``hydra/sweeper=optuna`` (the plugin's config, without our hook): the job refuses itself
    before any clip is encoded (``pipelines.evaluate`` calls ``check_sweep_objective``)."""
    sweep = work / "plugin_novel_search"
    proc = run(
        "lit_main_eval.py",
        "-m",
        "hydra/sweeper=optuna",
        "hydra.sweeper.n_trials=1",
        "hydra.sweeper.n_jobs=1",
        f"encoder={tiny_encoder}",
        "data=folder",
        f"data.root={episode_dataset}",
        "fewshot.episodes=10",
        f"hydra.sweep.dir={sweep}",
        expect_ok=False,
    )
    assert proc.returncode != 0 and "fewshot.split=novel under the sweeper" in proc.stdout, proc.stdout[-3000:]
    assert not list(sweep.glob("*/results.json"))


def hydra_node(sweeper: str, mode: str, overrides: list[str] = ()):
    return compose("eval", [f"hydra/sweeper={sweeper}", f"hydra.mode={mode}", "encoder=x.pt", *overrides])


@pytest.mark.parametrize("sweeper", ["optuna", "optuna_val"])
def test_check_sweep_objective_refuses_novel_classes_under_a_search(sweeper):
    from mmfsar.errors import ConfigError
    from mmfsar.utils.sweeps import check_sweep_objective

    cfg = hydra_node(sweeper, "MULTIRUN")
    message = r"fewshot\.split=novel under the sweeper .*OptunaSweeper.*fewshot\.split=val"
    with pytest.raises(ConfigError, match=message):
        check_sweep_objective(cfg, cfg.hydra)
    with pytest.raises(ConfigError, match=r"fewshot\.split=novel"):
        check_sweep_objective(cfg, cfg)  # a config holding the hydra node
    check_sweep_objective(hydra_node(sweeper, "MULTIRUN", ["fewshot.split=val"]), None)  # no HydraConfig: no sweep
    val = hydra_node(sweeper, "MULTIRUN", ["fewshot.split=val"])
    check_sweep_objective(val, val.hydra)  # val classes: allowed


def test_check_sweep_objective_lets_grids_single_runs_and_training_through():
    from mmfsar.utils.sweeps import check_sweep_objective

    grid = hydra_node("basic", "MULTIRUN")
    check_sweep_objective(grid, grid.hydra)  # the basic sweeper optimises nothing
    single = hydra_node("optuna_val", "RUN")
    check_sweep_objective(single, single.hydra)
    train = compose("pretrain", ["hydra/sweeper=optuna_val", "hydra.mode=MULTIRUN"])
    check_sweep_objective(train, train.hydra)  # val/acc: val classes by construction


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_refuse_novel_objective_reads_the_trials_split():
    import optuna
    from optuna.distributions import CategoricalDistribution

    from mmfsar.errors import ConfigError
    from mmfsar.utils.sweeps import refuse_novel_objective

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    novel_cfg = hydra_node("optuna_val", "MULTIRUN")
    val_cfg = hydra_node("optuna_val", "MULTIRUN", ["fewshot.split=val"])

    def trial(split: str | None = None, fixed: dict | None = None):
        study = optuna.create_study(direction="maximize")
        space = {}
        if split is not None:
            study.enqueue_trial({"fewshot.split": split})
            space = {"fewshot.split": CategoricalDistribution(["val", "novel"])}
        t = study.ask(space)
        for key, value in (fixed or {}).items():
            t.set_user_attr(key, value)
        return t

    refuse_novel_objective(val_cfg, trial())
    refuse_novel_objective(novel_cfg, trial("val"))  # the searched split wins over the config's
    with pytest.raises(ConfigError, match=r"fewshot\.split=novel"):
        refuse_novel_objective(val_cfg, trial("novel"))
    with pytest.raises(ConfigError, match=r"fewshot\.split=novel"):
        refuse_novel_objective(val_cfg, trial(fixed={"++fewshot.split": "novel"}))
    with pytest.raises(ConfigError, match=r"fewshot\.split=novel"):
        refuse_novel_objective(novel_cfg, trial())


# --------------------------------------------------------------------------- the GPU check script


def test_gpu_check_script_fails_early_without_a_gpu(tmp_path):
    script = REPO_ROOT / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "GPU_CHECK_OUT": str(tmp_path / "out")}
    proc = subprocess.run(["bash", str(script)], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "no CUDA GPU" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert not (tmp_path / "out").exists(), "nothing may run before the GPU check"
