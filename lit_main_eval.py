"""N-way K-shot evaluation of an exported encoder on novel classes. See configs/eval.yaml."""

import hydra
from omegaconf import DictConfig

import mmfsar.utils  # noqa: F401  (anchors paths.root_dir at the repository)


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> float | None:
    from mmfsar.tasks.pipelines import evaluate

    return evaluate(cfg).get("mean")


if __name__ == "__main__":
    main()
