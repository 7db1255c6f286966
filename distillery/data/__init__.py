"""Episode datasets: crash-safe zarr storage and windowed sequence sampling for policy training."""
from distillery.data.episodes import FORMAT_VERSION, EpisodeDataset, EpisodeWriter

__all__ = ["EpisodeWriter", "EpisodeDataset", "SequenceDataset", "FORMAT_VERSION"]


def __getattr__(name: str):
    # SequenceDataset needs torch; import it lazily so storage-only users (collection) start fast.
    if name == "SequenceDataset":
        from distillery.data.sequence import SequenceDataset

        return SequenceDataset
    raise AttributeError(f"module 'distillery.data' has no attribute {name!r}")
