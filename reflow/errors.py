"""The one exception type for problems the user can fix (bad paths, shapes, settings)."""


class ReflowError(Exception):
    """A user-fixable problem. The CLI shows its message as one red line and exits with code 2.

    The message should name the fix, e.g. ``"no such file: x.npy (pass an existing .npy array)"``.
    """
