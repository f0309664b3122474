"""Archive scale: ``radixpert-batch`` runs a bundle over many scans on Ray Data (extra ``[scale]``)."""
