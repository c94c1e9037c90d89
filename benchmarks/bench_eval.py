"""Encode once vs re-encoding every episode: the cost of few-shot evaluation, in one process.

The targets of the encode-once engine (:mod:`mmfsar.fewshot.engine`), measured on the default
synthetic dataset (``data/synthetic``, generated on first use) with one encoder and one episode set:

  (a) one encoder pass over the evaluated split (novel classes, target domain);
  (b) the full evaluation as ``lit_main_eval.py`` runs it: Lightning's test loop encodes every
      clip once, then 600 episodes (5-way 5-shot 15 queries) are solved on the cached features;
  (c) the protocol of MM-CDFSL's released code: every episode loads and encodes its support and
      query clips again, then fits its classifier; ``--reencode-episodes`` episodes are timed
      and the time is scaled to 600;
  (d) logistic regression on the features of (b): the batched torch solver (``solver=newton``) vs
      scikit-learn per episode (``solver=sklearn``), 600 episodes at 1 and 5 shots (``bench_logreg.run``).

``--classifier`` is the classifier of (b) and (c): ``logreg`` (default; MM-CDFSL's: the
batched newton solver in (b), scikit-learn's ``LogisticRegression()`` per episode in (c)) or ``prototype`` (``lit_main_eval.py``'s default). The default encoder is
configs/model/encoder/vit_tiny.yaml on RGB with random weights (``--encoder`` takes an export);
on such features logistic regression rarely converges within ``max_iter`` (neither does
scikit-learn), the slowest case for (b) and (d).

Targets: b/a <= 1.2 (matching heads: 1.5), c/b >= 20, (d) newton >= 20x faster than sklearn with accuracy
within 0.5 points.

    python benchmarks/bench_eval.py                       # vit_tiny, random weights, logreg
    python benchmarks/bench_eval.py --classifier prototype
    python benchmarks/bench_eval.py --encoder run/encoder.pt --reencode-episodes 24
    python benchmarks/bench_eval.py --classifier trx --set proj_dim=64 "cardinalities=[2]" \
        --episodes 10000 --queries 1 --shots 5        # the TRX protocol with the tiny presets' head
    python benchmarks/bench_eval.py --tiny                # a few episodes, one repeat (the test suite)

Prints one JSON object. (a) and (b) take turns ``--repeats`` times after a warm-up pass (so a
burst of other load hits both) and the best time of each counts; the data loader uses
``--workers`` processes in every path. Accuracies are in percent (mean ± 95% CI); (c)'s are
compared with (b)'s on the same episodes.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
try:
    import mmfsar  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning as L  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from mmfsar.data.datamodules import FewShotDataModule  # noqa: E402
from mmfsar.data.modalities import build_modalities  # noqa: E402
from mmfsar.fewshot import mean_confidence_interval  # noqa: E402
from mmfsar.fewshot.engine import FeatureBank, encode_views, episode_positions  # noqa: E402
from mmfsar.tasks.evaluate import FewShotEvalModule, default_chunk  # noqa: E402

CONFIGS = ROOT / "configs"
CLASSIFIERS = ("logreg", "prototype", "otam", "trx")


def build_classifier(name: str, encoder: torch.nn.Module, dm: FewShotDataModule, settings: list[str] = ()) -> torch.nn.Module:
    """configs/fewshot/classifier/<name>.yaml (with ``settings``, a dotlist such as
    ``proj_dim=64``) sized for the encoder's features on this data (a matching head with random
    weights: timing does not depend on them)."""
    from hydra.utils import instantiate

    from mmfsar.fewshot import build_classifier as sized
    from mmfsar.tasks.common import probe_frames

    cfg = OmegaConf.merge(OmegaConf.load(CONFIGS / "fewshot" / "classifier" / f"{name}.yaml"), OmegaConf.from_dotlist(list(settings)))
    factory = instantiate(cfg)
    return sized(factory, dim=encoder.feature_dim, num_frames=probe_frames(encoder, dm.clips[0])).eval()


def default_encoder(root: Path, modality: str = "rgb", seed: int = 0, **backbone_overrides) -> tuple[torch.nn.Module, dict, dict]:
    """configs/model/encoder/vit_tiny.yaml on ``modality`` as configs/modality/<modality>.yaml
    and configs/data/synthetic.yaml compose it, with random weights: (encoder, modalities, frames)."""
    from hydra.utils import instantiate

    from mmfsar.data.modalities import build_modalities
    from mmfsar.tasks.common import modality_encoder_config

    composed = OmegaConf.create(
        {
            "input": OmegaConf.load(CONFIGS / "input" / "synthetic.yaml"),
            "modality": OmegaConf.load(CONFIGS / "modality" / f"{modality}.yaml"),
            "frames": OmegaConf.load(CONFIGS / "data" / "synthetic.yaml").frames,
        }
    )
    config = OmegaConf.to_container(composed.modality, resolve=True)
    frames = OmegaConf.to_container(composed.frames, resolve=True)
    stream = build_modalities({modality: config})[modality]
    from mmfsar.data.meta import DatasetFolder

    stream.bind(DatasetFolder.open(root))  # channels (pose: joints) come from the dataset
    backbone = {**OmegaConf.to_container(OmegaConf.load(CONFIGS / "model" / "encoder" / "vit_tiny.yaml")), **backbone_overrides}
    encoder_config = modality_encoder_config(backbone, modality, {"num_frames": frames["num_frames"], **stream.encoder_inputs()})
    torch.manual_seed(seed)
    return instantiate(encoder_config, _convert_="all"), {modality: config}, frames


def load_encoder(path: str) -> tuple[torch.nn.Module, dict, dict]:
    from mmfsar.models.base import build_encoder, load_export

    payload = load_export(path)
    return build_encoder(payload), payload["modalities"], payload["frames"]


def datamodule(args: argparse.Namespace, modalities: dict, frames: dict) -> FewShotDataModule:
    from hydra.utils import instantiate

    data = OmegaConf.load(CONFIGS / "data" / "synthetic.yaml")
    generator = OmegaConf.to_container(data.generator) if args.data is None else None
    dm = FewShotDataModule(
        root=args.data or ROOT / "data" / "synthetic",
        generator=generator,
        modalities=build_modalities(modalities),
        frames=instantiate(frames),
        split="novel",
        domain="target",
        episodes={"n_way": args.ways, "k_shot": args.shots, "n_query": args.queries, "episodes": args.episodes, "seed": 0},
        eval_batch_size=args.batch_size,
        num_workers=args.workers,
    )
    dm.prepare_data()
    dm.setup("test")
    return dm


def encoder_pass(encoder: torch.nn.Module, dm: FewShotDataModule, frames: bool) -> tuple[float, torch.Tensor]:
    """(a): every clip of the split through the encoder once (data loading included)."""
    encoder.eval()
    start = time.perf_counter()
    bank = FeatureBank(len(dm.clips), 1)
    for batch in dm.test_dataloader():
        inputs = {m: batch[m] for m in encoder.modalities}
        bank.add(batch["index"], encode_views(encoder, inputs, batch["index"], frames=frames))
    features = bank.gather(lambda t: t, 1)
    return time.perf_counter() - start, features


def full_evaluation(encoder: torch.nn.Module, dm: FewShotDataModule, classifier: torch.nn.Module) -> tuple[float, FewShotEvalModule]:
    """(b): what ``lit_main_eval.py`` runs: Lightning's test loop, encode once, solve all episodes."""
    module = FewShotEvalModule(encoder=encoder, classifier=classifier, chunk=default_chunk(len(dm.episodes)), progress=False)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.test(module, datamodule=dm, verbose=False)
    return time.perf_counter() - start, module


class _EpisodeClips(torch.utils.data.Dataset):
    """One item per episode: its support then query clips, loaded (as MM-CDFSL's episode loader)."""

    def __init__(self, dataset: torch.utils.data.Dataset, positions: torch.Tensor, k_shot: int) -> None:
        self.dataset, self.positions, self.k_shot = dataset, positions, k_shot

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, e: int) -> dict:
        support = self.positions[e, :, : self.k_shot].reshape(-1).tolist()
        query = self.positions[e, :, self.k_shot :].reshape(-1).tolist()
        items = [self.dataset[i] for i in support + query]
        batch = torch.utils.data.default_collate(items)
        batch["support"] = len(support)
        return batch


def reencoding_protocol(
    encoder: torch.nn.Module, dm: FewShotDataModule, count: int, workers: int, classifier: str, head: torch.nn.Module
) -> tuple[float, list[float]]:
    """(c): per episode, load and encode its support and query clips, fit or apply the classifier
    (logreg: scikit-learn's ``LogisticRegression()``, as MM-CDFSL's code; any other: the same
    classifier as (b) on the episode's features), score the queries. Returns (seconds, accuracies)."""
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    settings = dm.episodes.settings
    positions = episode_positions(dm.episodes, [r.clip_id for r in dm.clips.records])[:count]
    loader = torch.utils.data.DataLoader(
        _EpisodeClips(dm.clips, positions, settings.k_shot), batch_size=None, num_workers=workers
    )
    n, k, q = settings.n_way, settings.k_shot, settings.n_query
    support_labels, query_labels = np.repeat(np.arange(n), k), np.repeat(np.arange(n), q)
    accuracies = []
    encoder.eval()
    start = time.perf_counter()
    for batch in loader:
        inputs = {m: batch[m] for m in encoder.modalities}
        with torch.no_grad():  # in batches of 64, as (a) and (b)
            outs = [encoder({m: x[i : i + 64] for m, x in inputs.items()}) for i in range(0, len(batch["index"]), 64)]
            features = torch.cat([o.frames if head.uses_frames else o.pooled[:, None] for o in outs])
        s = batch["support"]
        if classifier == "logreg":
            array = features[:, 0].double().numpy()
            with threadpool_limits(1), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = LogisticRegression().fit(array[:s], support_labels)
            predictions = model.predict(array[s:])
        else:
            with torch.no_grad():
                support = features[:s].reshape(1, n, k, *features.shape[1:])
                predictions = head(support, features[s:][None])[0].argmax(-1).numpy()
        accuracies.append(float((predictions == query_labels).mean()))
    return time.perf_counter() - start, accuracies


def summary(accuracies) -> dict:
    mean, ci = mean_confidence_interval(accuracies)
    return {"mean": round(mean, 2), "ci95": round(ci, 2)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--encoder", help="an exported encoder.pt (default: vit_tiny with random weights)")
    parser.add_argument("--modality", default="rgb", help="modality of the default encoder")
    parser.add_argument(
        "--classifier",
        choices=sorted(CLASSIFIERS),
        default="logreg",
        help="(b) and (c): logreg (MM-CDFSL: torch batched in (b), scikit-learn per episode in (c)), prototype, or a "
        "matching head on per-frame features (otam, trx; e.g. with --episodes 10000 --queries 1, the TRX protocol)",
    )
    parser.add_argument("--set", nargs="*", default=[], help="classifier settings, e.g. proj_dim=64 'cardinalities=[2]'")
    parser.add_argument("--data", help="dataset folder (default: data/synthetic, generated if missing)")
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--reencode-episodes", type=int, default=12, help="(c): episodes timed, scaled to --episodes")
    parser.add_argument("--repeats", type=int, default=2, help="(a) and (b): timed runs each (best counts)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="data-loader processes (every path)")
    parser.add_argument("--skip-logreg", action="store_true", help="skip (d)")
    parser.add_argument("--logreg-shots", type=int, nargs="+", default=[1, 5], help="(d): settings on (b)'s features")
    parser.add_argument("--logreg-episodes", type=int, default=600, help="(d): episodes per setting")
    parser.add_argument("--tiny", action="store_true", help="a few episodes, one repeat: checks that the script runs")
    args = parser.parse_args(argv)

    if args.tiny:
        args.episodes, args.reencode_episodes, args.repeats, args.logreg_episodes = 20, 2, 1, 20
    if args.data is None:  # the default dataset, generated on first use (as the entry points do)
        from mmfsar.data.synthetic import ensure_synthetic

        ensure_synthetic(ROOT / "data" / "synthetic", OmegaConf.to_container(OmegaConf.load(CONFIGS / "data" / "synthetic.yaml").generator))
    root = Path(args.data) if args.data else ROOT / "data" / "synthetic"
    encoder, modalities, frames = load_encoder(args.encoder) if args.encoder else default_encoder(root, args.modality)
    dm = datamodule(args, modalities, frames)
    clips = len(dm.clips)
    head = build_classifier(args.classifier, encoder, dm, args.set)

    encoder_pass(encoder, dm, head.uses_frames)  # warm-up: file cache, decoder, kernels
    a_times, b_times, module = [], [], None
    for _ in range(args.repeats):
        seconds, features = encoder_pass(encoder, dm, head.uses_frames)
        a_times.append(seconds)
        seconds, module = full_evaluation(encoder, dm, head)
        b_times.append(seconds)
    a, b = min(a_times), min(b_times)
    b_accuracy = module.episode_accuracy
    if not torch.allclose(module.features, features, atol=1e-5):
        print("warning: (a) and (b) features differ", file=sys.stderr)

    count = min(args.reencode_episodes, args.episodes)
    c_seconds, c_accuracy = reencoding_protocol(encoder, dm, count, args.workers, args.classifier, head)
    c = c_seconds / count * args.episodes

    report = {
        "benchmark": "eval",
        "encoder": args.encoder or f"vit_tiny on {args.modality} (random weights)",
        "classifier": " ".join([args.classifier, *args.set]),
        "dataset": str(dm.root),
        "clips_in_split": clips,
        "feature_dim": int(module.features.shape[-1]),
        "setting": f"{args.ways}-way {args.shots}-shot {args.queries} queries, {args.episodes} episodes",
        "torch_threads": torch.get_num_threads(),
        "loader_workers": args.workers,
        "a_encoder_pass_seconds": round(a, 3),
        "a_all": [round(t, 3) for t in a_times],
        "b_full_evaluation_seconds": round(b, 3),
        "b_all": [round(t, 3) for t in b_times],
        "c_reencode_seconds_scaled": round(c, 1),
        "c_reencode_episodes_timed": count,
        "c_reencode_seconds_per_episode": round(c_seconds / count, 3),
        "b_over_a": round(b / a, 3),
        "c_over_b": round(c / b, 1),
        "accuracy_b": summary(b_accuracy),
        "accuracy_b_on_c_episodes": summary(b_accuracy[:count]),
        "accuracy_c": summary(c_accuracy),
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    if not args.skip_logreg and args.classifier == "logreg":
        from bench_logreg import run

        from mmfsar.data.episodes import EpisodeSampler, EpisodeSettings

        records = dm.clips.records
        clip_ids = [r.clip_id for r in records]
        report["d_logreg"] = []
        for k_shot in args.logreg_shots:
            settings = EpisodeSettings(args.ways, k_shot, args.queries, args.logreg_episodes, seed=1)
            episodes = EpisodeSampler(clip_ids, [r.label_name for r in records], settings).sample()
            positions = episode_positions(episodes, clip_ids)
            report["d_logreg"].append(run(module.features[:, :1].mean(2, keepdim=True), positions, k_shot, repeats=1 if args.tiny else 3))
    limit = 1.2 if args.classifier in ("logreg", "prototype") else 1.5  # matching heads: 1.5
    report["targets"] = {
        f"b_over_a <= {limit}": report["b_over_a"] <= limit,
        "c_over_b >= 20": report["c_over_b"] >= 20,
    }
    if "d_logreg" in report:
        d = report["d_logreg"]
        report["targets"]["logreg newton >= 20x faster than sklearn"] = all(r["speedup"] >= 20 for r in d)
        report["targets"]["logreg accuracy within 0.5"] = all(abs(r["accuracy_difference"]) <= 0.5 for r in d)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
