"""Data: every source ends as uint8 tensors (N, 3, 32, 32) plus int64 labels; batching, cropping, flipping and
normalising happen on the training device, in a few vectorised tensor ops per batch.

- `images.py`: what every source ends as: `ImageSet` (a view of stored tensors that others share), a source's
  training and test sets (`DataSource`) and a run's splits (`DataSplits`);
- `image_folder.py`: an image folder (`train/<class>/*`, `test/<class>/*`): its listing, decoding and decode cache;
- `sources.py`: the sources (torchvision's CIFAR10, downloaded and cached; an image folder; a synthetic set with
  real class structure, for tests and demos) and the validation split: `load_source`, `split`, `load_splits`;
- `loader.py`: `DeviceLoader`, a split served on the training device as normalised, augmented batches.
"""
