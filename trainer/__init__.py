"""trainer: continual multi-task BERT learning from the labeled topic."""
