"""hpcvid: text-to-video pipeline (train_ae -> prep -> train -> render) as batch jobs on SLURM clusters."""
__version__ = "0.2.0"
