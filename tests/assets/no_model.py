WIDTH = 3


def helper(x):
    return x
