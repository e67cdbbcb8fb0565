"""jaxft_tiny_chat: chat rows (messages) and a text field, built by tests into a tmp data_dir.

        builder = Builder(data_dir=tmp, file_format="array_record"); builder.download_and_prepare()
"""

import tensorflow_datasets as tfds


def rows(split: str, n: int) -> list[dict]:
    """The examples of a split, so tests can compare what the pipeline reads with the truth."""
    return [{
            "text": f"{split} doc number {i}",
            "messages": [{"role": "user", "content": f"What is two plus {i}?"},
                                      {"role": "assistant", "content": f"It is {i + 2}."}],
    } for i in range(n)]


class Builder(tfds.core.GeneratorBasedBuilder):
    """Two splits of chat rows; a TFDS Sequence(dict) stores messages as a dict of lists."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
                "text": tfds.features.Text(),
                "messages": tfds.features.Sequence({"role": tfds.features.Text(),
                                                                                        "content": tfds.features.Text()}),
        }))

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {"train": self._generate_examples("train", 12),
                        "validation": self._generate_examples("validation", 4)}

    def _generate_examples(self, split, n):
        for i, row in enumerate(rows(split, n)):
            yield f"{split}-{i}", row
