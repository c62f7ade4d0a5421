"""The truly sparse (CSR) engine: inference of whole CNNs and training of MLPs, on several array backends."""
