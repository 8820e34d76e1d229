"""Plans to modules: building targets, module surgery, loading, the fine-tune plan and recipe.

Imports torch where it works on modules; names from files are data until trusted.
"""
