#ifndef ONE_H
#define ONE_H
/* Internal, with external linkage in a normal build: static in the amalgamation. */
int one_shared(int x);
extern const int one_table[3];
#endif
