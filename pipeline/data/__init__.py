"""Training data: the record formats and their labels (``formats``), the tokenised, memory-mapped cache (``prepared``),
and the built-in assets (``builtin``, ``assets/``)."""
