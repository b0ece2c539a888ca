"""Throughput of the training input pipeline (PNG decode + tokenisation + batching included).

    python bench/input_pipeline.py                      # tiny_64 SynthFace in a temp dir
    python bench/input_pipeline.py --data_dir=runs/data --config_name=small_64 \\
        --batch_size=64 --threads=0,1,2,4 --workers=0,2 --batches=200

Builds (or reuses) a SynthFace dataset and a SentencePiece model in `--data_dir` (a temporary
directory by default), then for each grain (worker processes, threads) setting prints
examples/s and batches/s of `make_train_iterator` after `--warmup` batches.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs"))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import data_synthface  # noqa: E402  (configs/, on the path above)

from unif2ace_jax.data import build, pipeline, records  # noqa: E402
from unif2ace_jax.data.text_tokenizer import train_sentencepiece  # noqa: E402

flags.DEFINE_string("data_dir", None, "TFDS data dir (default: a temporary directory).")
flags.DEFINE_string("config_name", "tiny_64", "synthface builder config.")
flags.DEFINE_integer("batch_size", 64, "Batch size.")
flags.DEFINE_list("threads", ["0", "1", "2"], "grain read thread counts to try.")
flags.DEFINE_list("workers", ["0"], "grain worker process counts to try (with each thread count).")
flags.DEFINE_integer("batches", 100, "Timed batches per setting.")
flags.DEFINE_integer("warmup", 5, "Untimed batches first.")
flags.DEFINE_integer("vocab_size", 256, "SentencePiece vocabulary for the bench tokenizer.")
flags.DEFINE_string("image_field", "image", "data.image_field.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    tmp = None
    data_dir = FLAGS.data_dir
    if data_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_input_")
        data_dir = tmp.name
    t0 = time.perf_counter()
    build.build_dataset("synthface", data_dir, config_name=FLAGS.config_name)
    print(f"dataset ready in {time.perf_counter() - t0:.1f} s: synthface/{FLAGS.config_name}")
    model = os.path.join(data_dir, f"bench_text_{FLAGS.vocab_size}.model")
    if not os.path.exists(model):
        texts = build.read_texts(data_dir, "synthface", FLAGS.config_name)
        train_sentencepiece(texts, FLAGS.vocab_size, model, model_type="bpe")
    config = data_synthface.get_config()
    data = config.data
    data.data_dir = data_dir
    data.config_name = FLAGS.config_name
    data.batch_size = FLAGS.batch_size
    data.image_field = FLAGS.image_field
    data.tokenizer.model_path = model
    n = len(records.load_builder(data_dir, "synthface", FLAGS.config_name).as_data_source("train"))
    print(f"train records: {n}, batch {FLAGS.batch_size}, max_text_len {data.max_text_len}, "
          f"mixture {dict(data.mixture)}, cpus {os.cpu_count()}")
    settings = [(int(w), int(t)) for w in FLAGS.workers for t in FLAGS.threads]
    for workers, threads in settings:
        it = pipeline.make_train_iterator(config, process_index=0, process_count=1,
                                          num_threads=threads, prefetch=max(2, 2 * threads),
                                          num_workers=workers)
        for _ in range(FLAGS.warmup):
            next(it)
        t = time.perf_counter()
        for _ in range(FLAGS.batches):
            next(it)
        dt = time.perf_counter() - t
        print(f"workers={workers} threads={threads}: "
              f"{FLAGS.batches * FLAGS.batch_size / dt:8.1f} examples/s  "
              f"{FLAGS.batches / dt:7.2f} batches/s")
        it.close()
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    app.run(main)
