"""The validate stage (see stage.py for what it does, step by step).

`write_gx_project` regenerates the committed gx/ project from the suite in code (suite.py);
`near_duplicates` and `shingles` are the near-duplicate search the stage uses (near_duplicates.py).
"""

from tasks.stages.validate.near_duplicates import near_duplicates, shingles
from tasks.stages.validate.stage import validate_dataset
from tasks.stages.validate.suite import write_gx_project

__all__ = ["near_duplicates", "shingles", "validate_dataset", "write_gx_project"]
