"""Math datasets by name, normalized to :class:`mathrl.types.Problem`.

``load_problems("math500")`` reads a local file in the common schema (``id, problem,
answer, solution, level, subject, source``, one JSON object per line) from ``data_dir``
or ``$MATHRL_DATA_DIR``; when there is none it loads the dataset's public hub id with
the ``datasets`` library (``pip install "mathrl[hub]"``). Any JSONL/JSON/CSV/Parquet file
or hub id works too, with a field mapping for other column names. Bad files fail with
the file, the line and the field; rows without an answer are skipped and counted.
"""

from mathrl.data.datasets import DATASETS, DatasetSpec, LoadedProblems, load_problems

__all__ = ["DATASETS", "DatasetSpec", "LoadedProblems", "load_problems"]
