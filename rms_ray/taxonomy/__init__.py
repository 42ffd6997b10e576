"""Emergent risk taxonomy: embedding, clustering, naming, reference (MLCommons) mapping, plot."""
