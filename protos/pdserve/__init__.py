"""Generated code of the pdserve proto packages (pdserve.v1 lives in the v1 subpackage)."""
