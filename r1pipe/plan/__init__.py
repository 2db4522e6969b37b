"""`r1pipe plan`: the memory and placement of a recipe's stages, worked out from model configs alone.

shapes (a model's FSDP units from its config), memory (bytes per device of a trainer and an engine worker),
layout (placement on nodes, the smallest layout that fits), stages (a recipe's stages, models and roles),
report (fit decisions and the text), cli (the command). docs/plan.md has the outputs for the shipped recipes.
"""
