"""Long Range Arena: the six tasks, loaders for LRA's released files, generators, tiny built-in versions.

    import longrange as lr
    train = lr.lra.load_split("listops", "train")                    # built-in tiny ListOps (generated)
    test = lr.lra.load_split("pathfinder", "test", "lra_release/pathfinder32", difficulty="curv_contour_length_14")
    loader = torch.utils.data.DataLoader(train, batch_size=32, collate_fn=lr.lra.collate)

    from longrange.lra.generate import generate                     # files in the released formats
    generate("listops", "data/listops", train=2000, val=200, test=200, seed=0)

See `tasks.py` for the token ids (0 = pad, 1 = CLS, task symbols from 2) and `loaders.py` for the
file layouts each loader reads.
"""

from longrange.lra.sources import load_split
from longrange.lra.tasks import TASKS, LRADataError, LRADataset, TaskSpec, collate

__all__ = ["TASKS", "LRADataError", "LRADataset", "TaskSpec", "collate", "load_split"]
