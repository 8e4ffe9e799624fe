"""Reading and writing tensor files.

    source.py   the :class:`~.source.TensorSource` protocol, safetensors, diffusers folders, :func:`~.source.open_file`
    pickle.py   torch pickles through an allow-list (no code from the file ever runs)
    writer.py   the container rule, output checks, the streaming safetensors writer
    ckpt.py     the streaming torch-pickle writer
    output.py   :func:`~.output.open_writer` / :func:`~.output.save_tensors` (the writer for a path)
    folder.py   :class:`~.folder.FolderOutput`, the one atomic folder output
"""
