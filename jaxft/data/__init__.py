"""jaxft.data: files and datasets -> tokenized, loss-masked, packed batches for training.

        from jaxft import data
        pipeline = data.DataPipeline(config, tokenizer)   # config.data.*, config.train.{batch_size,seed}
        it = pipeline.train_iterator()
        batch = next(it)
        state = it.get_state()            # JSON-able; it.set_state(state) on a fresh iterator resumes
        eval_batches = pipeline.validation_batches()     # list, or None without validation data

A batch is a dict of numpy arrays, each [host_batch, seq_len] where host_batch =
train.batch_size / number of hosts and seq_len = data.seq_len:
    input_ids       int32    token ids fed to the model
    targets         int32    next-token ids: logits at t are scored against targets[t] (labels
                                                      already shifted, per document, so no target crosses a document)
    loss_mask       float32  1.0 where targets[t] is trained (text: all; prompt_completion: the
                                                      completion + EOS; chat: assistant turns incl. end-of-turn), 0 elsewhere
    segment_ids     int32    0 = padding; documents in a packed row are 1, 2, ... n
    positions       int32    position within its document, reset to 0 at each document start
    attention_mask  int32    1 for real tokens (segment_ids > 0)
The model must let a token attend only to keys with the same segment_id, causally by position.

Rows (JSONL/Parquet/HF/TFDS): text -> {"text": ...}; prompt_completion -> {"prompt": ...,
"completion": ...}; chat -> {"messages": [{"role": ..., "content": ...}, ...]}; field names set
by data.*_field. Bad rows raise `DataError` naming file:line (or row) and the reason, or with
data.on_error="skip" are counted per reason in `pipeline.train_report`. Rows that train but
probably not as meant (a trained target that is the unknown token; a token spanning the
prompt/completion boundary) are warned about with file:line and counted in `pipeline.warnings`
(report.json's data_warnings). A `.json` file may hold one JSON array of rows.
Keys and defaults: `jaxft.data.config.DataDefaults`; `default_config()` gives them as a ConfigDict.
"""

from jaxft.data.config import DataDefaults, DataSettings, default_config, resolve
from jaxft.data.errors import DataError, LoadReport
from jaxft.data.formats import Encoder, TokenizerInfo
from jaxft.data.pipeline import BatchIterator, DataPipeline

__all__ = [
        "BatchIterator", "DataDefaults", "DataError", "DataPipeline", "DataSettings", "Encoder",
        "LoadReport", "TokenizerInfo", "default_config", "resolve",
]
