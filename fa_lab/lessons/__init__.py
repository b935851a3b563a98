"""Layer 7, lessons: helpers only the notebooks import (quick mode and saving, checked
puzzles, the online-softmax walk, SIMD demonstrations)."""
