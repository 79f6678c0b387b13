"""Logging a run's tables and files to every logger that can hold them: the samples table (`GenerateSamples`) and
the exported model card (`ExportPretrained`)."""

import csv
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger


def log_table(loggers: list[Logger], rows: list[dict[str, str]], step: int, name: str = "samples") -> list[str]:
    """Log a table (a dict per row) to each logger that can hold one; see `GenerateSamples`. Returns where it went."""
    columns, places = list(rows[0]), []
    for logger in loggers:
        if isinstance(logger, CSVLogger):
            path = Path(logger.log_dir) / name / f"step_{step}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=columns)
                writer.writeheader()
                writer.writerows(rows)
            places.append(str(path))
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text(name, markdown_table(columns, rows), global_step=step)
            places.append(f"TensorBoard text '{name}' in {logger.log_dir}")
        elif isinstance(logger, WandbLogger):
            logger.log_table(key=name, columns=columns, data=[[row[c] for c in columns] for row in rows], step=step)
            places.append(f"W&B table '{name}'")
        elif isinstance(logger, MLFlowLogger):
            logger.experiment.log_table(logger.run_id, data={c: [row[c] for row in rows] for c in columns},
                                        artifact_file=f"{name}/step_{step}.json")
            places.append(f"MLflow artifact {name}/step_{step}.json of run {logger.run_id}")
    return places


def log_file(loggers: list[Logger], path: Path, step: int) -> None:
    """Keep a file (the exported model card) with each logger's run: a W&B run file and an MLflow artifact,
    both under the name of its folder (`hf_model/README.md`), and TensorBoard text of that name."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.save(str(path), base_path=str(path.parent.parent), policy="now")
        elif isinstance(logger, MLFlowLogger):
            logger.experiment.log_artifact(logger.run_id, str(path), artifact_path=path.parent.name)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text(path.parent.name, path.read_text(), global_step=step)


def markdown_table(columns: list[str], rows: list[dict[str, str]]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", "\\n")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows])

