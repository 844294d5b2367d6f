"""Task data: built-in offline text tasks, user folders and saved datasets, stratified splits."""
