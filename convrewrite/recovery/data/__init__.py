"""Calibration data: open a ``--data`` SPEC (or a Python object) into a checked ``BatchSource``.

SPEC forms
----------
- a tensor file: ``.pt``/``.pth`` (read with ``torch.load(weights_only=True)`` only), ``.safetensors``,
  ``.npy``, ``.npz``. One tensor holds the samples along dim 0. Several named tensors are the
  forward's inputs by parameter name (tensors whose names are not parameters of ``forward``, such
  as ``labels``, are ignored and listed in the description). A ``.pt`` may also hold a tuple or
  list of tensors: the positional inputs.
- ``file.py:function`` or ``package.module:function``: a function taking no arguments. Returning a
  tensor or a dict of tensors gives all samples at once (like a tensor file). Returning a
  ``DataLoader`` over a map-style dataset splits its *samples* (by index) into fit and holdout and
  batches them with the loader's own ``collate_fn``. Returning any other iterable (a list, a
  generator, a ``DataLoader`` over an ``IterableDataset``) streams its *batches*: the function is
  called again for every pass, nothing is kept beyond the batch in hand, and the split is by batch
  index (see *Holdout*).
- nothing: a ``calibration_data()`` function in the model file, found like ``example_inputs()``,
  read like ``file.py:function``.
- a directory of PNG/JPEG images (searched recursively, sorted by path; needs the ``images`` extra,
  ``pip install 'convrewrite[images]'``). Each image is converted to the example input's channels
  (1: grey, 3: RGB), resized so that it covers the example's height and width, center-cropped to
  them, scaled to [0, 1] and normalised with ``mean``/``std`` when given. A ``preprocess(image)``
  function in the model file replaces all of that: it receives the PIL image and returns one
  sample tensor (a torchvision ``Compose`` works).

Batch forms
-----------
A batch is read the way ``example_inputs()`` is read: a tensor is the one positional input, a tuple
or list holds the positional inputs, a dict holds the inputs by parameter name (keys that are not
parameters of ``forward`` are dropped). **Labelled loaders:** a batch that does not have the
example input's form but is a pair (tuple or list of two) whose *first* element has it is an
``(inputs, labels)`` pair, and the second element is ignored. So for a model whose example input is
one tensor, ``(images, labels)`` from a labelled ``DataLoader`` is read as images plus ignored
labels; a model whose example input is two tensors of the right shapes reads the same pair as its
two inputs. The reading is decided on the first batch and must hold for every batch.

"Has the example input's form" means: as many positional inputs and the same named inputs, each
tensor with the example's shape except dim 0 and a dtype of the same kind (floating data is cast
to the example's floating dtype; integer data for a floating input is refused). A batch whose
shapes differ from the example's is run once through the original model (variable-sized inputs
work where the model accepts them); if that fails, it does not fit the model.

Checks
------
Before any work, every problem is one ``UsageError`` (exit 2) naming what was expected and what
was found: a missing or unreadable file, an empty set, too few samples to hold some out, the wrong
number of inputs, a shape, a dtype, NaN or Inf values, disagreeing sample counts, a batch that does
not fit the model. Tensor files are checked whole when opened. Streamed sources and datasets are
checked by one pass over the data when opened (``scan=True``, the default: it also counts the
samples) and every batch is checked again as it streams. Image directories have every file's
header read when opened (a decoding failure later names the file).

Holdout
-------
``holdout`` (default 0.1: ``sources.HOLDOUT``, from the schema) of the data is never fitted on;
every fidelity figure is measured on it.
Samples held in memory, datasets and image directories split by sample index
(``batches.holdout_indices``: a seeded permutation, ``ceil(holdout * count)`` held out). Streams
split by batch index without knowing the count up front: batch i is held out when
``ceil((i + 1) * holdout) > ceil(i * holdout)``, so batches 0, 10, 20, ... with the default 0.1.
A stream must give the same batches in the same order on every call (no shuffling, no random
augmentation): each batch's checksum from the opening scan is compared on every later pass.

Under ``torchrun`` each rank takes its shard of the fit split (``rank``/``world_size`` of
``BatchSource.batches``), all shards equally long.

The package, by concept: ``forms`` (what the model takes, reading and checking one batch),
``sources`` (streams and datasets, re-read on every pass; the holdout checks), ``tensors`` (tensor
files), ``images`` (image directories) and ``opening`` (a SPEC or a Python object into a source).
"""

from __future__ import annotations

from convrewrite.recovery.data.forms import InputForm, Reading, read_item
from convrewrite.recovery.data.images import ImageFiles, image_files, open_image_directory
from convrewrite.recovery.data.opening import calibration_data_from, model_function, open_calibration_data
from convrewrite.recovery.data.sources import DatasetBatches, StreamBatches, stream_is_held_out

__all__ = [
    "DatasetBatches",
    "ImageFiles",
    "InputForm",
    "Reading",
    "StreamBatches",
    "calibration_data_from",
    "image_files",
    "model_function",
    "open_calibration_data",
    "open_image_directory",
    "read_item",
    "stream_is_held_out",
]
