"""The files a run writes and reads: atomic, staged writes and the restricted loader (``checkpoint_io``, over
``safe_pickle``), and the ``.pdema`` format with each tensor stored once per checkpoint set (``state_file``)."""
