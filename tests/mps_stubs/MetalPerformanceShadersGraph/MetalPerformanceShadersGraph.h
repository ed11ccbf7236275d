// Syntax-check stand-in (see ../Metal/Metal.h): what torch's ATen/mps/MPSStream.h names.
#pragma once
#include <Metal/Metal.h>
@interface MPSGraph : NSObject
@end
@interface MPSGraphExecutionDescriptor : NSObject
@end
@interface MPSGraphCompilationDescriptor : NSObject
@end
