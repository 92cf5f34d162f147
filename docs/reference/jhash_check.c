/* The kernel's jhash_3words (include/linux/jhash.h), to cross-check nodeport-common::hash. */
#include <stdio.h>
#include <stdint.h>
typedef uint32_t u32;
static inline u32 rol32(u32 w, unsigned s) { return (w << s) | (w >> ((-s) & 31)); }
#define JHASH_INITVAL 0xdeadbeef
#define __jhash_final(a, b, c) { \
	c ^= b; c -= rol32(b, 14); a ^= c; a -= rol32(c, 11); b ^= a; b -= rol32(a, 25); \
	c ^= b; c -= rol32(b, 16); a ^= c; a -= rol32(c, 4);  b ^= a; b -= rol32(a, 14); \
	c ^= b; c -= rol32(b, 24); }
static inline u32 __jhash_nwords(u32 a, u32 b, u32 c, u32 initval)
{ a += initval; b += initval; c += initval; __jhash_final(a, b, c); return c; }
static inline u32 jhash_3words(u32 a, u32 b, u32 c, u32 initval)
{ return __jhash_nwords(a, b, c, initval + JHASH_INITVAL + (3 << 2)); }
int main(void) {
	printf("0x%08x\n", jhash_3words(1, 2, 3, 0));
	printf("0x%08x\n", jhash_3words(0xc6120001, 0x12345678, 6, 42));
	return 0;
}
