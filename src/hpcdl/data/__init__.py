"""Data library: fetch a source's raw files with pinned digests (sources, download), decode them (formats),
and turn them into the preprocessed uint8 .npy dataset that training memory-maps (prepare).

Every step writes atomically and records sha256 digests, so a killed run never leaves output that looks
complete and a re-run can tell good files from bad ones."""
