"""Tasks, models and training helpers behind the demo, the examples and the reproduction tests.

Examples:
    >>> from lab.copy_paste import CopyPasteTask
    >>> batch = CopyPasteTask(min_len=3, max_len=4).sample(2, seed=0)
    >>> batch["input_ids"].shape[0]
    2
"""
