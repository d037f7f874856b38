"""The dataset directory: manifest, rejects and latent shards (format in docs/formats.md)."""

from bigasp.store.layout import FORMAT_VERSION
from bigasp.store.legacy import LegacyLatent, read_bigasp_latent
from bigasp.store.reader import LatentDataset
from bigasp.store.shard import RecordMeta, ShardWriter

__all__ = [
    "FORMAT_VERSION",
    "LatentDataset",
    "LegacyLatent",
    "RecordMeta",
    "ShardWriter",
    "read_bigasp_latent",
]
