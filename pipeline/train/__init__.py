"""A training run: the start decision (``start``), building model, optimizer and engine (``build``), the loop (``loop``)
and its loss (``loss``), the session around it (``session``), checkpoints (``checkpoint``) and resume checks
(``resume``)."""
