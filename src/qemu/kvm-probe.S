/* KVM probe firmware (sqlite-sim, src/qemu/accel.rs embeds the bytes it assembles to).
   Real mode -> 32-bit protected mode -> 64-bit long mode with paging, printing one letter per
   mode on COM1, then exiting QEMU through isa-debug-exit (status 33). Mapped at 0xF0000 as a
   64 KiB -bios image; the reset vector jumps to its start.
   Build: gcc -c -x assembler-with-cpp kvm-probe.S -o p.o && ld -Ttext=0 --oformat binary -o p.bin p.o */
#define BASE 0xF0000
#define OUT(c) mov $c, %al; out %al, %dx
    .text
    .code16
start:
    cli
    mov $0x3f8, %dx
    OUT('R')
    lgdtl %cs:(gdtr)
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $0x08, $(BASE + pm32)
    .code32
pm32:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $0x3f8, %dx
    OUT('P')
    mov $0x1000, %edi
    xor %eax, %eax
    mov $3072, %ecx
    rep stosl
    movl $0x2003, 0x1000
    movl $0x3003, 0x2000
    movl $0x83, 0x3000
    mov $0x1000, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $0x20, %eax
    mov %eax, %cr4
    mov $0xC0000080, %ecx
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80000000, %eax
    mov %eax, %cr0
    ljmp $0x18, $(BASE + lm64)
    .code64
lm64:
    mov $0x3f8, %dx
    OUT('L')
    OUT('\n')
    mov $0xf4, %dx
    mov $0x10, %al
    out %al, %dx
1:  hlt
    jmp 1b
    .p2align 3
gdt:
    .quad 0
    .quad 0x00cf9a000000ffff
    .quad 0x00cf92000000ffff
    .quad 0x00af9a000000ffff
gdt_end:
gdtr:
    .word gdt_end - gdt - 1
    .long BASE + gdt
    .org 0xfff0, 0xff
    .code16
    ljmp $0xf000, $start
    .org 0x10000, 0xff
