"""The memory plan: what a recipe needs per GPU before anything is loaded (``memory_plan``)."""
