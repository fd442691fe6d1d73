"""Remote memory: the ExCache (pComponent side) over userfaultfd."""
