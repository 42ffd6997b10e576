"""rms_ray: build real-world multimodal safety (RMS) datasets from real photos with Ray Data + vLLM.

Method: image-oriented, self-adaptive construction after "Self-adaptive Dataset Construction for Real-World
Multimodal Safety Scenarios" (arXiv 2509.04403, EMNLP 2025 Findings). Only the abstract is public; where the
paper is silent the choices made here are documented in README.md ("Method and choices").
"""

__version__ = "0.1.0"
