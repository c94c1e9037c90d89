"""Evaluation of exported encoders: N-way K-shot episodes on novel classes (configs/eval.yaml), or
a clip-level protocol with ``--config-name eval_protocol`` (configs/eval_protocol.yaml)."""

import hydra
from omegaconf import DictConfig

import mmfsar.utils  # noqa: F401  (anchors paths.root_dir at the repository)


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> float | None:
    from mmfsar.tasks.pipelines import evaluate, evaluate_protocol

    run = evaluate_protocol if "protocol" in cfg else evaluate
    result = run(cfg)
    return result.get("top1", result.get("mean"))


if __name__ == "__main__":
    main()
