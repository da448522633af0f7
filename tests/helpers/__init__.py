"""What several test modules share: fixtures, writers of test data and readers of what a run left behind. Test
modules import from here (`from helpers.images import image_folder`), never from one another
(tests/test_structure.py checks it).

- `images.py`: image folders (PNG, JPEG) and a digest of tensors;
- `cifar10.py`: a stand-in CIFAR-10 archive served over HTTP, and torchvision pointed at it;
- `runs.py`: a command in a process or in this one, a run's error lines, the files of a folder, waiting on
  processes;
- `sweeps.py`: sweep files of the tiny run, the folder a sweep file's runs go to, the sweep's state and table as a
  test reads them, and how long a sweep's processes are waited for;
- `engine.py`: the engine's training parts on the CPU, an epoch driven alone, a GPU pretended until the capture;
- `filesystems.py`: a small or a read-only file system (tmpfs) mounted for a test; root without its override of
  folder permissions;
- `wandb_records.py`: the records of an offline W&B run;
- `wandb_agent.py`: W&B's own agent in a child process (`tests/wandb_agent_driver.py`).
"""
