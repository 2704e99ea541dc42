"""AdaptBIR beyond one machine: photo collections on a Ray cluster (Ray Data). Optional: `adaptbir[ray]`."""
